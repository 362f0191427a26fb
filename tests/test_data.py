"""load_preferences: every source format from a hand-written fixture, bad-row accounting, strict mode, errors.

Fixtures (tests/fixtures) are small rows written by hand in the shape of the public datasets they mimic;
parquet and arrow copies are written here with pyarrow so the reader is tested against files it did not
write. Expected values are read off the fixture rows by hand (the bad rows sit at the indexes noted).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_fast.data.formats import (
    ASSISTANT_MARKER,
    FORMATS,
    HUMAN_MARKER,
    load_preferences,
    load_preferences_with_report,
)

FIXTURES = Path(__file__).parent / "fixtures"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# One fixture per format


def test_explicit_jsonl_keeps_good_rows_and_reports_bad_ones():
    ds, report = load_preferences_with_report(FIXTURES / "explicit.jsonl")
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == [
        {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
        {
            "prompt": "Write a haiku about the sea.",
            "chosen": " Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time",
            "rejected": " The sea is big.",
        },
        {"prompt": "Is the moon made of cheese?", "chosen": " No, it is rock.", "rejected": " Yes."},
    ]
    assert report.format == "explicit"
    assert report.rows_read == 8 and report.pairs == 3 and report.num_skipped == 5
    assert dict(report.skipped) == {
        "missing field": 1,
        "empty field": 1,
        "chosen identical to rejected": 1,
        "not a string": 1,
        "invalid JSON": 1,
    }
    assert [index for index, _ in report.examples] == [1, 3, 4, 5, 6]
    assert "'rejected' is missing" in report.examples[0][1]
    assert "line 7" in report.examples[4][1]


def test_explicit_strict_raises_at_first_bad_row():
    with pytest.raises(ValueError, match=r"explicit\.jsonl: row 1 .*'rejected' is missing"):
        load_preferences(FIXTURES / "explicit.jsonl", strict=True)


def test_implicit_prompt_json_splits_at_last_shared_assistant_turn():
    source = json.loads((FIXTURES / "hh_implicit.json").read_text())
    ds, report = load_preferences_with_report(FIXTURES / "hh_implicit.json")
    assert report.format == "implicit_prompt"
    assert ds[0] == {
        "prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "chosen": " Paris is the capital of France.",
        "rejected": " I don't know.",
    }
    # Multi-turn: every earlier turn is context, only the last Assistant turn is a completion.
    assert ds[1]["prompt"] == (
        "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    )
    assert ds[1]["rejected"] == " No."
    # Both answers start with " Yes": the shared words stay in the completions.
    assert ds[2]["chosen"] == " Yes, water makes things wet." and ds[2]["rejected"] == " Yes."
    for row, original in zip(ds, source[:3]):
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]
    assert dict(report.skipped) == {"differ before final turn": 1, "no shared prompt": 1}
    assert [index for index, _ in report.examples] == [3, 4]


def test_explicit_csv_with_multiline_quoted_fields():
    ds, report = load_preferences_with_report(FIXTURES / "explicit.csv")
    assert ds.to_list() == [
        {"prompt": "\n\nHuman: Write two lines.\n\nAssistant:", "chosen": " First line.\nSecond line.",
         "rejected": " One line."},
        {"prompt": 'Quote "this".', "chosen": " He said “this”.", "rejected": " No."},
    ]
    assert dict(report.skipped) == {"missing field": 1} and report.examples[0][0] == 1


@pytest.fixture
def ultrafeedback_parquet(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(read_jsonl(FIXTURES / "ultrafeedback.jsonl")), path)
    return path


def test_conversational_parquet_like_ultrafeedback(ultrafeedback_parquet):
    ds, report = load_preferences_with_report(ultrafeedback_parquet)
    assert report.format == "conversational"
    assert ds[0] == {
        "prompt": [user("Write one word about the sun.")],
        "chosen": [assistant("Bright.")],
        "rejected": [assistant("Cold.")],
    }
    assert ds[1]["prompt"] == [
        system("Be brief."), user("Write one word about the sun."), assistant("Bright."), user("And the moon?"),
    ]
    assert ds[1]["chosen"] == [assistant("Pale.")]
    assert ds[1]["rejected"] == [assistant("The moon is a natural satellite of the Earth.")]
    assert dict(report.skipped) == {"no assistant turn": 1} and report.examples[0][0] == 2
    message_list = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert all(ds.data.schema.field(name).type == message_list for name in ds.column_names)


def test_folder_picks_the_split_files(tmp_path, ultrafeedback_parquet):
    folder = tmp_path / "data"
    folder.mkdir()
    ultrafeedback_parquet.rename(folder / ultrafeedback_parquet.name)
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    assert len(load_preferences(folder)) == 2
    assert load_preferences(folder, split="test").to_list() == [{"prompt": "p", "chosen": " a", "rejected": " b"}]


@pytest.fixture
def nectar_arrow(tmp_path):
    table = pa.Table.from_pylist(read_jsonl(FIXTURES / "nectar.jsonl"))
    path = tmp_path / "nectar.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def test_ranked_arrow_best_vs_worst(nectar_arrow):
    ds, report = load_preferences_with_report(nectar_arrow)
    assert report.format == "ranked"
    assert ds.to_list() == [
        {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "chosen": "An apple is a fruit.", "rejected": "Carrot."},
        {"prompt": "\n\nHuman: Say yes.\n\nAssistant:", "chosen": "Yes.", "rejected": "No."},
    ]
    assert dict(report.skipped) == {"no preference": 1} and report.examples[0][0] == 2


def test_ranked_best_vs_each_from_a_saved_dataset_folder(tmp_path):
    rows = read_jsonl(FIXTURES / "nectar.jsonl")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "nectar"))
    ds = load_preferences(tmp_path / "nectar", pairing="best_vs_each")
    assert [(r["chosen"], r["rejected"]) for r in ds] == [
        ("An apple is a fruit.", "Banana."),
        ("An apple is a fruit.", "Carrot."),
        ("Yes.", "No."),
    ]


def test_ranked_with_message_prompt_gives_chat_rows():
    rows = [{"prompt": [user("Q?")], "answers": [{"answer": "bad", "rank": 3}, {"answer": "good", "rank": 1}]}]
    assert load_preferences(rows).to_list() == [
        {"prompt": [user("Q?")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}
    ]


def test_orca_json_lines_under_json_name():
    ds, report = load_preferences_with_report(FIXTURES / "orca.json")
    assert report.format == "orca"
    assert ds.to_list() == [
        {
            "prompt": [system("You are a helpful assistant."), user("What is 3 times 3?")],
            "chosen": [assistant("3 times 3 is 9.")],
            "rejected": [assistant("It is 6.")],
        },
        {
            "prompt": [user("Translate 'hello' to French.")],
            "chosen": [assistant("Bonjour.")],
            "rejected": [assistant("Hola.")],
        },
    ]
    assert dict(report.skipped) == {"empty field": 1} and report.examples[0][0] == 2


# --------------------------------------------------------------------------------------------------
# In-memory sources and the conversational variants


def test_explicit_messages_in_memory_dataset():
    prompt = [system("S"), user("u1"), assistant("a1"), user("u2")]
    source = datasets.Dataset.from_list(
        [{"prompt": prompt, "chosen": [assistant("good")], "rejected": [assistant("bad")]}]
    )
    ds, report = load_preferences_with_report(source)
    assert report.format == "conversational"
    assert ds.to_list() == [{"prompt": prompt, "chosen": [assistant("good")], "rejected": [assistant("bad")]}]


def test_conversational_prompt_list_repeated_in_completions_is_not_doubled():
    prompt = [user("u1")]
    rows = [{"prompt": prompt, "chosen": prompt + [assistant("x")], "rejected": prompt + [assistant("y")]}]
    assert load_preferences(rows)[0]["prompt"] == prompt


def test_conversational_prompt_string_becomes_user_turn_when_nothing_is_shared():
    rows = [{"prompt": "Hi?", "chosen": [assistant("Hello.")], "rejected": [assistant("Go.")]}]
    assert load_preferences(rows, format="explicit")[0]["prompt"] == [user("Hi?")]


def test_conversational_differing_before_final_turn_is_bad():
    rows = [
        {"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
         "rejected": [user("a"), assistant("B"), user("c"), assistant("D")]},
        {"chosen": [user("a"), assistant("x")], "rejected": [user("a"), assistant("y")]},
    ]
    ds, report = load_preferences_with_report(rows)
    assert len(ds) == 1 and dict(report.skipped) == {"differ before final turn": 1}
    with pytest.raises(ValueError, match=r"row 0 .*differ before the final assistant turn"):
        load_preferences(rows, strict=True)


def test_dataset_dict_split_and_missing_split():
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])})
    assert len(load_preferences(dd, split="test")) == 1
    with pytest.raises(ValueError, match=r"no split 'train'.*\['test'\]"):
        load_preferences(dd)


def test_mixed_text_and_chat_rows_keep_the_first_kind():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ]
    ds, report = load_preferences_with_report(rows)
    assert ds.to_list() == [rows[0]] and dict(report.skipped) == {"mixed text and chat": 1}


def test_bad_rows_are_logged(caplog):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}]
    with caplog.at_level(logging.WARNING, logger="dpo_fast.data"):
        load_preferences(rows)
    assert "1 rows skipped" in caplog.text and "row 1: chosen identical to rejected" in caplog.text


@settings(max_examples=40, deadline=None)
@given(
    turns=st.lists(st.tuples(st.text("abc xyz.?", min_size=1, max_size=12), st.text("abc xyz.!", min_size=1,
                                                                                      max_size=12)),
                   max_size=3),
    question=st.text("abc xyz?", min_size=1, max_size=12),
    shared=st.text("abc ", max_size=6),
    answers=st.lists(st.from_regex(r"[a-f][a-f .!\n]{0,11}", fullmatch=True), min_size=2, max_size=2, unique=True),
)
def test_implicit_prompt_recovers_generated_transcripts(turns, question, shared, answers):
    """Transcripts built from known turns: the split must give back exactly the shared conversation up to
    the final Assistant marker, and the two final answers (which may share leading words)."""
    context = "".join(f"{HUMAN_MARKER} {h}{ASSISTANT_MARKER} {a}" for h, a in turns)
    context += f"{HUMAN_MARKER} {question}{ASSISTANT_MARKER}"
    chosen, rejected = (" " + shared + answer for answer in answers)
    ds, report = load_preferences_with_report([{"chosen": context + chosen, "rejected": context + rejected}])
    assert report.num_skipped == 0
    assert ds[0] == {"prompt": context, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------------------------------
# Errors


def test_unrecognised_columns_list_what_was_seen_and_the_formats():
    with pytest.raises(ValueError) as info:
        load_preferences([{"question": "q", "answer": "a"}])
    message = str(info.value)
    assert "['answer', 'question']" in message
    for name in FORMATS:
        assert name in message


def test_forced_format_needs_its_columns():
    with pytest.raises(ValueError, match=r"format 'explicit' needs columns .*missing \['prompt'\]"):
        load_preferences(FIXTURES / "hh_implicit.json", format="explicit")


@pytest.mark.parametrize(("kwargs", "match"), [({"format": "bogus"}, "format='bogus'"),
                                               ({"pairing": "all"}, "pairing='all'")])
def test_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_preferences([{"prompt": "p", "chosen": "a", "rejected": "b"}], **kwargs)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing_folder/data"])
def test_missing_file_names_it(name):
    path = FIXTURES / name
    with pytest.raises(FileNotFoundError, match=name):
        load_preferences(path)
    with pytest.raises(FileNotFoundError, match=name):
        load_preferences(str(path))


def test_no_usable_rows_is_an_error():
    with pytest.raises(ValueError, match=r"no usable preference pairs.*2 rows skipped"):
        load_preferences([{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a"}])


def test_empty_source_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no rows"):
        load_preferences(path)


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="source must be"):
        load_preferences(42)


def test_hub_dataset_name_goes_to_load_dataset_with_the_split(monkeypatch):
    # No network here: datasets.load_dataset is replaced by a stand-in that serves the hh-rlhf fixture
    # under its Hub name, and records what it was asked for.
    rows = json.loads((FIXTURES / "hh_implicit.json").read_text())
    asked = []

    def fake_load_dataset(name, split=None, **kwargs):
        asked.append((name, split, kwargs))
        if name != "Anthropic/hh-rlhf":
            raise FileNotFoundError(f"Dataset {name!r} doesn't exist on the Hub")
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, report = load_preferences_with_report("Anthropic/hh-rlhf", split="test")
    assert asked == [("Anthropic/hh-rlhf", "test", {})]
    assert report.format == "implicit_prompt"
    assert ds[0]["chosen"] == " Paris is the capital of France."
    assert len(ds) == len(rows) - sum(report.skipped.values())
    # The Hub's own error reaches the caller unchanged.
    with pytest.raises(FileNotFoundError, match="doesn't exist on the Hub"):
        load_preferences("nobody/no-such-dataset")


@pytest.mark.parametrize("encode", [json.dumps, repr], ids=["json", "python-repr"])
def test_conversational_csv_with_message_lists_in_cells(tmp_path, encode):
    # A CSV export of ultrafeedback-like rows: each message list is a cell of text, as json.dumps or as
    # pandas' to_csv (the Python repr) writes it. It loads as the same conversations as the JSON lines.
    import csv

    rows = read_jsonl(FIXTURES / "ultrafeedback.jsonl")
    path = tmp_path / "prefs.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: encode(v) if isinstance(v, list) else v for k, v in row.items()})
    from_csv, csv_report = load_preferences_with_report(path)
    from_jsonl, jsonl_report = load_preferences_with_report(FIXTURES / "ultrafeedback.jsonl")
    assert csv_report.format == jsonl_report.format == "conversational"
    assert from_csv.to_list() == from_jsonl.to_list()
    assert dict(csv_report.skipped) == dict(jsonl_report.skipped)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf8_byte_order_mark_costs_no_row(tmp_path, suffix):
    rows = [{"prompt": f"q{i} é", "chosen": "good", "rejected": "bad"} for i in range(3)]
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        text = json.dumps(rows)
    else:
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    dataset, report = load_preferences_with_report(str(path))
    assert report.num_skipped == 0 and dataset["prompt"] == [r["prompt"] for r in rows]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_latin1_file_is_an_error_naming_the_file_and_line(tmp_path, suffix):
    lines = ['{"prompt": "q", "chosen": "a", "rejected": "b"}',
             '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}']
    if suffix == ".json":
        text = "[" + ",\n".join(lines) + "]"
    elif suffix == ".csv":
        text = "prompt,chosen,rejected\nq,a,b\ncaf\u00e9,a,b\n"
    else:
        text = "\n".join(lines) + "\n"
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(text.encode("latin-1"))
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(ValueError, match=rf"latin1{suffix}' line {line} is not UTF-8 text"):
        load_preferences(str(path))
