"""tokenize_pair / tokenize_dataset invariants with the tiny in-code BPE tokenizer.

The oracle is the tokenizer itself applied to whole texts: the prompt's ids are those of the prompt text
alone, and prompt ids + completion ids (less the closing EOS) are the ids of the continuous text whenever
no BPE merge crosses the boundary; truncation is checked against the untruncated pair.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizer import IM_END, WORDS, make_tokenizer

from dpo_fast.data.formats import load_preferences
from dpo_fast.data.pairs import TokenizedPair
from dpo_fast.data.tokenization import tokenize_dataset, tokenize_pair, tokenize_row

TOK = make_tokenizer()
TOK_BOS = make_tokenizer(bos=True)
EOS = TOK.eos_token_id
BOS = TOK_BOS.bos_token_id
UNLIMITED = 1 << 20


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def render(messages, generation_prompt: bool) -> str:
    return TOK.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def text_row(rng: random.Random, prompt_words: int, chosen_words: int, rejected_words: int) -> dict:
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    return {
        "prompt": f"\n\nHuman: {words(prompt_words)}?\n\nAssistant:",
        "chosen": f" {words(chosen_words)}.",
        "rejected": f" {words(rejected_words)}!",
    }


# --------------------------------------------------------------------------------------------------
# Plain text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_pair_shares_the_prompt_and_ends_with_eos(seed):
    row = text_row(random.Random(seed), 7, 5, 9)
    pair = tokenize_pair(TOK, row, index=seed)
    assert isinstance(pair, TokenizedPair) and pair.index == seed
    assert list(pair.prompt_ids) == encode(TOK, row["prompt"])
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        assert ids[-1] == EOS and EOS not in ids[:-1]
        # No merge crosses " word" boundaries here, so the split is that of the continuous text.
        assert list(pair.prompt_ids + ids[:-1]) == encode(TOK, row["prompt"] + row[name])
        assert TOK.decode(pair.prompt_ids + ids) == row["prompt"] + row[name] + IM_END


def test_completion_already_ending_with_eos_gets_no_second_one():
    pair = tokenize_pair(TOK, {"prompt": "Question:", "chosen": " yes" + IM_END, "rejected": " no"})
    assert pair.chosen_ids[-1] == EOS and pair.chosen_ids[-2] != EOS
    assert pair.rejected_ids[-1] == EOS


def test_bos_from_the_post_processor_starts_the_prompt_only():
    row = {"prompt": "Tell me a story:", "chosen": " the cat sat.", "rejected": " no."}
    pair = tokenize_pair(TOK_BOS, row)
    assert pair.prompt_ids == (BOS, *encode(TOK_BOS, row["prompt"]))
    assert BOS not in pair.chosen_ids and BOS not in pair.rejected_ids


def find_boundary_merge() -> tuple[str, str]:
    """A (prompt, completion) whose continuous text merges tokens across the boundary, found from the
    tokenizer's own vocabulary rather than hard-coded."""
    head = "\n\nHuman: say a word\n\nAssistant:"
    for word in sorted(WORDS, key=len, reverse=True):
        for cut in range(2, len(word)):
            prompt, completion = f"{head} {word[:cut]}", word[cut:] + " please."
            prompt_ids = encode(TOK, prompt)
            if encode(TOK, prompt + completion)[: len(prompt_ids)] != prompt_ids:
                return prompt, completion
    raise AssertionError("the tiny tokenizer has no multi-character merge to split")


def test_boundary_merge_keeps_the_prompt_ids_and_the_text():
    prompt, completion = find_boundary_merge()
    row = {"prompt": prompt, "chosen": completion, "rejected": " " + completion}
    pairs, stats = tokenize_dataset(TOK, [row], max_length=UNLIMITED)
    (pair,) = pairs
    assert stats.boundary_fallbacks == 1  # chosen merges with the prompt's last token; " ..." does not
    assert list(pair.prompt_ids) == encode(TOK, prompt)
    assert list(pair.chosen_ids[:-1]) == encode(TOK, completion)
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        assert TOK.decode(pair.prompt_ids + ids) == prompt + row[name] + IM_END


# --------------------------------------------------------------------------------------------------
# Chat


def test_chat_pair_renders_prompt_with_generation_prompt_and_scores_only_the_last_turn():
    prompt = [{"role": "system", "content": "Be brief."}, user("hello"), assistant("hello world"), user("two?")]
    row = {"prompt": prompt, "chosen": [assistant("two three")], "rejected": [assistant("no")]}
    pair = tokenize_pair(TOK, row)
    prompt_text = render(prompt, True)
    assert list(pair.prompt_ids) == encode(TOK, prompt_text)
    assert "hello world" in TOK.decode(pair.prompt_ids)  # earlier turns are context
    for name in ("chosen", "rejected"):
        ids = getattr(pair, f"{name}_ids")
        full_text = render(prompt + row[name], False)
        # ChatML closes a turn with "<|im_end|>\n": the completion stops at the EOS, where generation stops.
        assert full_text.endswith(IM_END + "\n")
        assert list(pair.prompt_ids + ids) == encode(TOK, full_text[: -len("\n")])
        assert ids[-1] == EOS and EOS not in ids[:-1]
        assert TOK.decode(ids) == row[name][0]["content"] + IM_END


def test_chat_string_completions_are_assistant_turns():
    prompt = [user("hello")]
    as_strings = tokenize_pair(TOK, {"prompt": prompt, "chosen": "yes", "rejected": "no"})
    as_messages = tokenize_pair(TOK, {"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("no")]})
    assert as_strings == as_messages


def test_chat_without_template_names_the_tokenizer():
    row = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    with pytest.raises(ValueError, match=r"tokenizer 'tiny-bpe' has no chat_template.*row 3"):
        tokenize_pair(make_tokenizer(chat_template=False), row, index=3)


def test_template_that_rewrites_the_prompt_is_an_error():
    tokenizer = make_tokenizer()
    # The generation prompt says "assistant" but a rendered assistant turn says "bot": no shared prefix.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    with pytest.raises(ValueError, match=r"row 0: the chat template .* does not start with the rendered prompt"):
        tokenize_pair(tokenizer, row, index=0)


def test_text_prompt_with_message_completions_is_a_type_error():
    with pytest.raises(TypeError, match=r"row 5: the prompt is a string, so chosen must be a string"):
        tokenize_pair(TOK, {"prompt": "p", "chosen": [assistant("a")], "rejected": "b"}, index=5)


def test_tokenizer_without_eos_is_an_error():
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tiny-bpe-chatml' has no eos_token"):
        tokenize_pair(tokenizer, {"prompt": "p", "chosen": "a", "rejected": "b"})


# --------------------------------------------------------------------------------------------------
# Truncation


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lengths=st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30)),
    max_length=st.integers(2, 60),
    max_prompt_fraction=st.one_of(st.none(), st.floats(0.0, 0.99)),
    truncation=st.sampled_from(["keep_end", "keep_start"]),
    bos=st.booleans(),
)
def test_truncation_invariants(seed, lengths, max_length, max_prompt_fraction, truncation, bos):
    tokenizer = TOK_BOS if bos else TOK
    row = text_row(random.Random(seed), *lengths)
    max_prompt_length = None if max_prompt_fraction is None else max(1, int(max_prompt_fraction * max_length))
    full = tokenize_pair(tokenizer, row, max_length=UNLIMITED)
    pair = tokenize_pair(
        tokenizer, row, max_length=max_length, truncation=truncation, max_prompt_length=max_prompt_length
    )
    prompt, chosen, rejected = full.prompt_ids, full.chosen_ids, full.rejected_ids
    longest = max(len(chosen), len(rejected))
    # The documented rule: the prompt keeps min(P, max_prompt_length) tokens when that is given, else it
    # gives way to the completions down to one token; completions get the rest.
    if max_prompt_length is None:
        kept = max(1, min(len(prompt), max_length - longest))
    else:
        kept = min(len(prompt), max_prompt_length)
    budget = max_length - kept
    if chosen[:budget] == rejected[:budget]:
        assert pair is None
        return
    assert pair is not None
    assert len(pair.prompt_ids) == kept
    assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= max_length
    assert len(pair.chosen_ids) >= 1 and len(pair.rejected_ids) >= 1
    if truncation == "keep_start":
        assert pair.prompt_ids == prompt[:kept]
    elif bos and kept >= 2:
        assert pair.prompt_ids == (BOS, *prompt[len(prompt) - kept + 1 :])
    else:
        assert pair.prompt_ids == prompt[len(prompt) - kept :]
    for cut, whole in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
        assert cut == whole[: len(cut)]  # completions keep their start
        if len(cut) < len(whole):
            assert len(cut) == budget  # cut ones fill the room; they end mid-text, without EOS
        else:
            assert cut[-1] == EOS
    if len(prompt) + longest <= max_length and (max_prompt_length is None or len(prompt) <= max_prompt_length):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (prompt, chosen, rejected)


def test_keep_end_keeps_the_generation_prompt_of_a_long_chat():
    prompt = [user(" ".join(WORDS))]
    row = {"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    pair = tokenize_pair(TOK, row, max_length=12)
    assert TOK.decode(pair.prompt_ids).endswith(IM_END + "\n<|im_start|>assistant\n")
    assert pair.chosen_ids == tuple(encode(TOK, "yes" + IM_END))


def test_pairs_identical_after_truncation_and_empty_prompts_are_dropped_and_counted():
    rows = [
        {"prompt": "Question:", "chosen": " the cat sat on the mat.", "rejected": " the cat sat on the dog."},
        {"prompt": "", "chosen": " yes", "rejected": " no"},
        {"prompt": "Question:", "chosen": " yes", "rejected": " no"},
    ]
    pairs, stats = tokenize_dataset(TOK, rows, max_length=6, max_prompt_length=2)
    assert [pair.index for pair in pairs] == [2]
    assert stats.rows == 3 and stats.pairs == 1 and stats.num_dropped == 2
    assert dict(stats.dropped) == {"chosen and rejected token ids identical after truncation": 1,
                                   "no prompt tokens": 1}
    assert [index for index, _ in stats.examples] == [0, 1]
    # With BOS the empty prompt still has a token to predict the first completion token from.
    pairs, _ = tokenize_dataset(TOK_BOS, rows[1:2])
    assert pairs[0].prompt_ids == (BOS,)


def test_tokenize_row_says_why_a_row_is_dropped():
    rows = [
        {"prompt": "Question:", "chosen": " the cat sat on the mat.", "rejected": " the cat sat on the dog."},
        {"prompt": "Question:", "chosen": "  ", "rejected": " no"},
        {"prompt": "Question:", "chosen": " yes", "rejected": " yes"},
    ]
    reasons = [tokenize_row(TOK, row, max_length=6, max_prompt_length=2).drop_reason for row in rows]
    assert reasons == ["chosen and rejected token ids identical after truncation", "empty chosen completion",
                       "chosen and rejected token ids identical"]
    kept = tokenize_row(TOK, rows[0], max_length=64)
    assert kept.drop_reason is None and kept.pair == tokenize_pair(TOK, rows[0], max_length=64)


def test_stats_record_the_longest_cut_prompt_and_completion():
    long_prompt = " ".join(["hello world"] * 30)
    rows = [{"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
            {"prompt": "Question:", "chosen": " the cat sat on the mat " * 5, "rejected": " no"},
            {"prompt": "Question:", "chosen": " yes", "rejected": " no"}]
    pairs, stats = tokenize_dataset(TOK, rows, max_length=16, max_prompt_length=8)
    assert stats.prompts_truncated == 1 and stats.completions_truncated == 1
    assert stats.longest_prompt_cut == len(encode(TOK, long_prompt))
    assert stats.longest_completion_cut == len(encode(TOK, rows[1]["chosen"])) + 1  # + EOS


def test_tokenize_dataset_on_a_loaded_fixture():
    dataset = load_preferences(Path(__file__).parent / "fixtures" / "hh_implicit.json")
    pairs, stats = tokenize_dataset(TOK, dataset, max_length=24)
    assert [pair.index for pair in pairs] == list(range(len(dataset)))
    assert stats.pairs == len(dataset) and stats.num_dropped == 0
    assert stats.prompt_tokens == sum(len(p.prompt_ids) for p in pairs)
    assert stats.completion_tokens == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert stats.longest_sequence <= 24 and stats.prompts_truncated >= 1
    for pair, row in zip(pairs, dataset):
        assert pair == tokenize_pair(TOK, row, max_length=24, index=pair.index)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 1}, "max_length must be an int >= 2"),
        ({"truncation": "middle"}, "truncation='middle'"),
        ({"max_length": 8, "max_prompt_length": 8}, r"max_prompt_length must be None or an int in \[1, max_length=8\)"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_pair(TOK, {"prompt": "p", "chosen": "a", "rejected": "b"}, **kwargs)
