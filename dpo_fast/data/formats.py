"""Preference data: load pairs from files, the Hub or memory into one normalised form.

`load_preferences` returns a `datasets.Dataset` with exactly three columns, `prompt`, `chosen`, `rejected`,
in one of two kinds (one kind per dataset, fixed by its first usable row):

* text: three strings. The prompt ends where the response starts (e.g. "...\\n\\nAssistant:").
* chat: three lists of {"role", "content"} messages. `prompt` holds every earlier turn (system, user and
  earlier assistant turns: multi-turn context); `chosen` / `rejected` hold only the final assistant
  turn(s), the only tokens that get scored. Tokenization renders them with the model's chat template.

Source formats (`format="auto"` picks one from the column names, then the first row's types):

=================  =====================================================================================
explicit           prompt, chosen, rejected. Strings (text), or messages: prompt as a message list (or a
                   string, taken as one user turn) and chosen/rejected as message lists (or strings, taken
                   as one assistant turn).
implicit_prompt    chosen, rejected only: full transcripts as in Anthropic/hh-rlhf
                   ("\\n\\nHuman: ...\\n\\nAssistant: ..."). The prompt is their longest common prefix cut
                   after its last "\\n\\nAssistant:"; chosen/rejected are the rest.
conversational     chosen, rejected as message lists that may repeat the conversation, as in
                   HuggingFaceH4/ultrafeedback_binarized (extra columns such as messages or score_* are
                   ignored). The leading messages they share are the prompt; a `prompt` message list that
                   they do not repeat is put in front of it, and a `prompt` string is used (as a user turn)
                   only when they share nothing.
ranked             prompt, answers = [{answer, rank}, ...] as in berkeley-nest/Nectar; lower rank is
                   better. pairing="best_vs_worst" gives one pair per row, "best_vs_each" one pair per
                   answer ranked strictly worse than the best.
orca               system, question, chosen, rejected as in Intel/orca_dpo_pairs. Becomes chat: prompt
                   [system (if not empty), user question], completions [assistant answer], so that the
                   model's own chat template frames them, as it does at inference.
=================  =====================================================================================

Bad rows are skipped and counted, not fatal: a missing field, an empty or non-string completion or
prompt, chosen identical to rejected, a message list without an assistant turn, responses that differ
before their final assistant turn, unparseable JSON. `load_preferences_with_report` returns a `LoadReport`
with the counts and the first few row indexes and reasons; `load_preferences` logs it. strict=True
raises ValueError at the first bad row instead. Row indexes count rows of the source from 0 in reading
order (for JSON lines: non-blank lines).
"""

from __future__ import annotations

import ast
import csv
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

FORMATS = ("explicit", "implicit_prompt", "conversational", "ranked", "orca")
PAIRINGS = ("best_vs_worst", "best_vs_each")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".arrow")

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"
# Roles that belong to the context, never to a scored completion.
CONTEXT_ONLY_ROLES = frozenset({"system", "user"})

# How many bad rows a report (and the log) names individually.
MAX_REPORTED_EXAMPLES = 5
# Rows read ahead to find the column names of a source that does not declare them (lists, JSON).
DETECTION_ROWS = 100

Message = dict[str, str]


@dataclass
class LoadReport:
    """What `load_preferences` did. skipped: bad-row count per reason; examples: (row index, reason) of
    the first `MAX_REPORTED_EXAMPLES` bad rows."""

    source: str
    format: str
    rows_read: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source}: format {self.format}, {self.rows_read} rows read -> {self.pairs} pairs"
        if self.num_skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
            first = "; ".join(f"row {index}: {detail}" for index, detail in self.examples)
            text += f", {self.num_skipped} rows skipped ({reasons}). First: {first}"
        return text


class BadRow(ValueError):
    """A row that cannot give a preference pair. reason: short category for counting; detail: the
    full message."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


# --------------------------------------------------------------------------------------------------
# Public API


def load_preferences(
    source: Any,
    *,
    split: str = "train",
    format: str = "auto",
    strict: bool = False,
    pairing: str = "best_vs_worst",
) -> datasets.Dataset:
    """Loads preference pairs into a Dataset with columns prompt, chosen, rejected (see the module doc).

    source: a local file (.jsonl, .json, .parquet, .csv, .arrow) or folder (of such files, or saved with
        `Dataset.save_to_disk`), a `datasets.Dataset` / `DatasetDict`, a list of row dicts, or a Hub
        dataset name for `datasets.load_dataset`. In a CSV, a message list is a cell holding its JSON (or
        its Python repr, as pandas writes it).
    split: the split of a DatasetDict, a Hub dataset, or a folder of split files (train.jsonl, ...).
    format: "auto" or one of `FORMATS`. pairing: how "ranked" rows become pairs, one of `PAIRINGS`.
    strict: raise ValueError at the first bad row instead of skipping it.

    The skipped-row report is logged (warning level when rows were skipped);
    `load_preferences_with_report` also returns it.
    """
    dataset, report = load_preferences_with_report(
        source, split=split, format=format, strict=strict, pairing=pairing
    )
    return dataset


def load_preferences_with_report(
    source: Any,
    *,
    split: str = "train",
    format: str = "auto",
    strict: bool = False,
    pairing: str = "best_vs_worst",
) -> tuple[datasets.Dataset, LoadReport]:
    """`load_preferences`, also returning the `LoadReport` (rows read, pairs, skipped rows and why)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format={format!r} is not known; expected 'auto' or one of {', '.join(FORMATS)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not known; expected one of {', '.join(PAIRINGS)}")

    name, columns, rows = _open_source(source, split)
    rows = iter(rows)
    head = list(itertools.islice(rows, DETECTION_ROWS))
    if not head:
        raise ValueError(f"{name}: no rows to read preference pairs from")
    if columns is None:
        columns = list(dict.fromkeys(key for row in head if isinstance(row, Mapping) for key in row))
    fmt = detect_format(columns, head) if format == "auto" else format
    _check_columns(fmt, columns, name)

    report = LoadReport(source=name, format=fmt)
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    kind: str | None = None  # "text" or "chat", fixed by the first usable row
    for index, row in enumerate(itertools.chain(head, rows)):
        report.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, Mapping):
                raise BadRow("not a record", f"expected a record of fields, got {type(row).__name__}")
            pairs = parse_row(row, fmt, pairing=pairing)
            for pair in pairs:
                pair_kind = "chat" if isinstance(pair[0], list) else "text"
                if kind is None:
                    kind = pair_kind
                elif pair_kind != kind:
                    raise BadRow(
                        "mixed text and chat",
                        f"row is {pair_kind} but the dataset's first rows are {kind}: one kind per dataset",
                    )
        except BadRow as bad:
            if strict:
                raise ValueError(f"{name}: row {index} ({fmt} format): {bad.detail}") from None
            report.skipped[bad.reason] += 1
            if len(report.examples) < MAX_REPORTED_EXAMPLES:
                report.examples.append((index, bad.detail))
            continue
        for prompt, chosen, rejected in pairs:
            out["prompt"].append(prompt)
            out["chosen"].append(chosen)
            out["rejected"].append(rejected)
            report.pairs += 1

    if report.pairs == 0:
        raise ValueError(f"no usable preference pairs: {report.summary()}")
    (logger.warning if report.num_skipped else logger.info)("%s", report.summary())
    return datasets.Dataset.from_dict(out, features=_features(kind)), report


def detect_format(columns: Sequence[str], rows: Sequence[Any] = ()) -> str:
    """The source format from its column names (and, between explicit/conversational/implicit, the type
    of the first `chosen` value in `rows`). Raises ValueError naming the columns when none fits."""
    cols = set(columns)
    if {"prompt", "answers"} <= cols:
        return "ranked"
    if {"question", "chosen", "rejected"} <= cols:
        return "orca"
    if {"chosen", "rejected"} <= cols:
        first_chosen = next(
            (row["chosen"] for row in rows if isinstance(row, Mapping) and row.get("chosen") is not None), None
        )
        if isinstance(first_chosen, list):
            return "conversational"
        return "explicit" if "prompt" in cols else "implicit_prompt"
    raise ValueError(
        f"cannot tell the preference format from the columns {sorted(cols)}; known formats: "
        "explicit (prompt, chosen, rejected), implicit_prompt (chosen, rejected transcripts), "
        "conversational (chosen, rejected message lists), ranked (prompt, answers), "
        "orca (system, question, chosen, rejected). Rename the columns or pass format="
    )


def parse_row(row: Mapping[str, Any], format: str, *, pairing: str = "best_vs_worst") -> list[tuple]:
    """One source row -> its (prompt, chosen, rejected) pairs in the normalised form (one pair, or several
    for ranked rows with pairing="best_vs_each"). Raises BadRow."""
    if format != "ranked" and row.get("chosen") is not None and row.get("chosen") == row.get("rejected"):
        raise BadRow("chosen identical to rejected")
    if format == "explicit":
        pairs = [_parse_explicit(row)]
    elif format == "implicit_prompt":
        pairs = [_parse_implicit(row)]
    elif format == "conversational":
        pairs = [_parse_conversational(row)]
    elif format == "ranked":
        pairs = _parse_ranked(row, pairing)
    elif format == "orca":
        pairs = [_parse_orca(row)]
    else:
        raise ValueError(f"format={format!r} is not known; expected one of {', '.join(FORMATS)}")
    for _, chosen, rejected in pairs:
        if chosen == rejected:
            raise BadRow("chosen identical to rejected")
    return pairs


# --------------------------------------------------------------------------------------------------
# Row parsers


def _field(row: Mapping[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise BadRow("missing field", f"field {name!r} is missing")
    return value


def _text(row: Mapping[str, Any], name: str, *, what: str = "") -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise BadRow("not a string", f"field {name!r}{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty field", f"field {name!r}{what} is empty")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    """A message list with string roles and contents, reduced to {"role", "content"}."""
    if not isinstance(value, list):
        raise BadRow("not a message list", f"field {name!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise BadRow("bad message", f"{name}[{i}] must be a {{role, content}} record, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadRow("bad message", f"{name}[{i}] has no role")
        if not isinstance(content, str):
            raise BadRow("bad message", f"{name}[{i}] content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _completion(messages: list[Message], name: str) -> list[Message]:
    """Checks that the completion part of a conversation is only assistant (or tool) turns, ending in a
    non-empty assistant turn."""
    if not messages:
        raise BadRow("no assistant turn", f"{name} has no turn after the context it shares with the other response")
    for i, message in enumerate(messages):
        if message["role"] in CONTEXT_ONLY_ROLES:
            raise BadRow(
                "differ before final turn",
                f"chosen and rejected differ before the final assistant turn ({name} has a {message['role']} "
                f"turn after the point where they part, completion message {i}); only the final turn may differ",
            )
    if messages[-1]["role"] != "assistant":
        raise BadRow("no assistant turn", f"{name} does not end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise BadRow("empty completion", f"{name}'s final assistant turn is empty")
    return messages


def _parse_explicit(row: Mapping[str, Any]) -> tuple:
    prompt, chosen, rejected = _field(row, "prompt"), _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
        return _parse_conversational(row)
    return _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")


def _parse_implicit(row: Mapping[str, Any]) -> tuple:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise BadRow(
            "no shared prompt",
            f"chosen and rejected share no prefix ending with {ASSISTANT_MARKER!r} (shared: {common[:60]!r})",
        )
    cut += len(ASSISTANT_MARKER)
    prompt, chosen_part, rejected_part = chosen[:cut], chosen[cut:], rejected[cut:]
    for name, part in (("chosen", chosen_part), ("rejected", rejected_part)):
        if not part.strip():
            raise BadRow("empty completion", f"{name} has no text after the shared prompt")
        if HUMAN_MARKER in part:
            raise BadRow(
                "differ before final turn",
                f"chosen and rejected differ before the final Assistant turn ({name}'s completion has a "
                "Human turn); only the final turn may differ",
            )
    return prompt, chosen_part, rejected_part


def _parse_conversational(row: Mapping[str, Any]) -> tuple:
    chosen = _as_messages(_field(row, "chosen"), "chosen", default_role="assistant")
    rejected = _as_messages(_field(row, "rejected"), "rejected", default_role="assistant")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    context = chosen[:shared]
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt_messages = _messages(prompt, "prompt")
        if context[: len(prompt_messages)] != prompt_messages:
            context = prompt_messages + context
    elif isinstance(prompt, str) and not context and prompt.strip():
        context = [{"role": "user", "content": prompt}]
    if not context:
        raise BadRow("missing field", "no prompt: no 'prompt' field and no turns shared by chosen and rejected")
    completions = []
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no assistant turn", f"{name} has no assistant turn")
        completions.append(_completion(messages[shared:], name))
    return context, completions[0], completions[1]


def _as_messages(value: Any, name: str, *, default_role: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty field", f"field {name!r} is empty")
        return [{"role": default_role, "content": value}]
    return _messages(value, name)


def _parse_ranked(row: Mapping[str, Any], pairing: str) -> list[tuple]:
    prompt = _field(row, "prompt")
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt")
    else:
        prompt = _text(row, "prompt")
    answers = _field(row, "answers")
    if not isinstance(answers, list):
        raise BadRow("bad answers", f"field 'answers' must be a list, got {type(answers).__name__}")
    ranked = []
    for i, answer in enumerate(answers):
        if not isinstance(answer, Mapping):
            raise BadRow("bad answers", f"answers[{i}] must be an {{answer, rank}} record")
        text, rank = answer.get("answer"), answer.get("rank")
        if not isinstance(text, str) or not text.strip():
            raise BadRow("empty completion", f"answers[{i}].answer must be a non-empty string")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise BadRow("bad answers", f"answers[{i}].rank must be a number, got {type(rank).__name__}")
        ranked.append((rank, i, text))
    if len(ranked) < 2:
        raise BadRow("bad answers", f"need at least two answers to rank, got {len(ranked)}")
    ranked.sort()  # by rank, then by position: the first-listed answer wins a tie for best
    best_rank, _, best = ranked[0]
    if isinstance(prompt, list):
        wrap = lambda text: [{"role": "assistant", "content": text}]
    else:
        wrap = lambda text: text
    worse = [text for rank, _, text in ranked if rank > best_rank]
    if not worse:
        raise BadRow("no preference", "all answers share the same rank")
    if pairing == "best_vs_worst":
        worse = worse[-1:]
    pairs = [(prompt, wrap(best), wrap(text)) for text in worse if text != best]
    if not pairs:
        raise BadRow("chosen identical to rejected")
    return pairs


def _parse_orca(row: Mapping[str, Any]) -> tuple:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRow("not a string", f"field 'system' must be a string, got {type(system).__name__}")
    prompt = [{"role": "system", "content": system}] if system and system.strip() else []
    prompt.append({"role": "user", "content": _text(row, "question")})
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    return prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]


_REQUIRED_COLUMNS = {
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "ranked": ("prompt", "answers"),
    "orca": ("question", "chosen", "rejected"),
}


def _check_columns(fmt: str, columns: Sequence[str], name: str) -> None:
    missing = [c for c in _REQUIRED_COLUMNS[fmt] if c not in columns]
    if missing:
        raise ValueError(
            f"{name}: format {fmt!r} needs columns {list(_REQUIRED_COLUMNS[fmt])}; missing {missing} "
            f"(columns seen: {sorted(columns)})"
        )


def _features(kind: str | None) -> datasets.Features:
    if kind == "chat":
        message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
        return datasets.Features({"prompt": message, "chosen": message, "rejected": message})
    return datasets.Features({name: datasets.Value("string") for name in ("prompt", "chosen", "rejected")})


# --------------------------------------------------------------------------------------------------
# Sources: each gives (name for messages, column names or None, iterator of rows). A row that cannot be
# read at all (bad JSON) is yielded as a BadRow so that it is counted like any other bad row.


def _open_source(source: Any, split: str) -> tuple[str, list[str] | None, Iterable[Any]]:
    if isinstance(source, datasets.DatasetDict):
        return _open_dataset(_pick_split(source, split, "DatasetDict"), f"DatasetDict[{split!r}]")
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return _open_dataset(source, type(source).__name__)
    if isinstance(source, (list, tuple)):
        return f"list of {len(source)} rows", None, source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            return str(path), None, _read_file(path, split)
        if path.is_dir():
            return _open_folder(path, split)
        if _looks_like_path(str(source)):
            raise FileNotFoundError(f"preference data not found: {str(source)!r} is not a file or folder")
        # Anything else is a Hub dataset name; load_dataset's own errors say what went wrong.
        loaded = datasets.load_dataset(str(source), split=split)
        return _open_dataset(loaded, f"{source}[{split}]")
    raise TypeError(
        "source must be a path, a Hub dataset name, a datasets.Dataset / DatasetDict or a list of row dicts, "
        f"got {type(source).__name__}"
    )


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", ".", "~")) or text.lower().endswith(FILE_EXTENSIONS):
        return True
    # "data/prefs" where data/ exists here is a path with a typo, not the Hub dataset "data/prefs".
    first = Path(text).parts[0] if text else ""
    return bool(first) and Path(first).is_dir()


def _pick_split(dataset_dict: Mapping[str, Any], split: str, name: str) -> Any:
    if split not in dataset_dict:
        raise ValueError(f"{name} has no split {split!r}; splits: {sorted(dataset_dict)}")
    return dataset_dict[split]


def _open_dataset(dataset: Any, name: str) -> tuple[str, list[str] | None, Iterable[Any]]:
    columns = dataset.column_names
    return name, list(columns) if columns is not None else None, dataset


def _open_folder(path: Path, split: str) -> tuple[str, list[str] | None, Iterable[Any]]:
    if any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return _open_dataset(_pick_split(loaded, split, str(path)), f"{path}[{split!r}]")
        return _open_dataset(loaded, str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"preference data folder {str(path)!r} holds no {'/'.join(FILE_EXTENSIONS)} files")
    # A folder of split files (train.jsonl, test.jsonl, train-00000.parquet): take the requested split.
    split_files = [p for p in files if p.name.startswith(split) or p.parent.name == split]
    files = split_files or files
    rows = itertools.chain.from_iterable(_read_file(p, split) for p in files)
    return str(path), None, rows


def _read_file(path: Path, split: str) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _utf8_text(path, lambda: _read_json_lines(path))
    if suffix == ".json":
        return _utf8_text(path, lambda: _read_json(path, split))
    if suffix == ".csv":
        return _utf8_text(path, lambda: _read_csv(path))
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".arrow":
        return _read_arrow(path)
    raise ValueError(f"{str(path)!r}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_EXTENSIONS)}")


# Text files are read as UTF-8; "utf-8-sig" also drops the byte-order mark some editors write first (it
# would otherwise make row 0 invalid JSON, or rename the first CSV column).
_TEXT_ENCODING = "utf-8-sig"


def _utf8_text(path: Path, read: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """The rows `read()` gives from a text file; a file that is not UTF-8 is an error naming it and its
    first undecodable line."""
    try:
        yield from read()
    except UnicodeDecodeError as e:
        data = path.read_bytes()
        newline = b"\n"
        try:
            data.decode("utf-8")
            where = ""
        except UnicodeDecodeError as first:
            where = f" line {data.count(newline, 0, first.start) + 1}"
        raise ValueError(f"{str(path)!r}{where} is not UTF-8 text ({e.reason}); convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8`") from None


def _read_json_lines(path: Path) -> Iterator[Any]:
    with open(path, encoding=_TEXT_ENCODING) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow("invalid JSON", f"line {line_number} is not valid JSON ({e.msg})")


def _read_json(path: Path, split: str) -> Iterator[Any]:
    with open(path, encoding=_TEXT_ENCODING) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # many ".json" preference files are JSON lines
            return _read_json_lines(path)
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get(split), list):
        data = data[split]
    if not isinstance(data, list):
        raise ValueError(
            f"{str(path)!r}: expected a JSON list of records (or {{{split!r}: [...]}}), "
            f"got a {type(data).__name__}" + (f" with keys {sorted(data)[:10]}" if isinstance(data, dict) else "")
        )
    return iter(data)


def _read_csv(path: Path) -> Iterator[Any]:
    # An empty cell reads as a missing field. CSV has no nesting, so conversational exports write each
    # message list as text: JSON, or the Python repr pandas' to_csv gives; such a cell becomes the list.
    with open(path, encoding=_TEXT_ENCODING, newline="") as f:
        for row in csv.DictReader(f):
            yield {key: _csv_cell(value) for key, value in row.items() if key is not None}


def _csv_cell(value: str) -> Any:
    if value == "":
        return None
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return value
    for parse in (json.loads, ast.literal_eval):  # literal_eval evaluates literals only, never code
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        is_messages = isinstance(parsed, list) and parsed and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in parsed)
        return parsed if is_messages else value
    return value


def _read_parquet(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _read_arrow(path: Path) -> Iterator[Any]:
    # Arrow IPC: the file format (pyarrow.ipc / feather) or the stream format (datasets' cache files).
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        for batch in batches:
            yield from batch.to_pylist()
