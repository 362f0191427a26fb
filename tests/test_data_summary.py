"""The data summary a run prints before training: counts, truncation, duplicates, tokens, padding, warnings."""

from __future__ import annotations

import json

import pytest
from tiny_tokenizer import make_tokenizer

from dpo_fast.data.formats import load_preferences_with_report
from dpo_fast.data.pairs import TokenizedPair
from dpo_fast.data.summary import TRUNCATION_WARNING_FRACTION, layout_padding, summarize_data
from dpo_fast.data.tokenization import tokenize_dataset

TOK = make_tokenizer()


def test_long_prompts_cut_to_max_length_are_counted_and_warned_about(tmp_path):
    long_prompt = " ".join(["hello world"] * 80)  # about 160 tokens
    rows = [{"prompt": long_prompt, "chosen": f" yes {i}", "rejected": " no"} for i in range(3)]
    rows += [{"prompt": "Question:", "chosen": " the cat sat", "rejected": " the dog sat"}] * 2  # one duplicate
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n"
                    + json.dumps({"prompt": "Question:", "chosen": "", "rejected": " no"}) + "\n")
    dataset, report = load_preferences_with_report(str(path))
    pairs, stats = tokenize_dataset(TOK, dataset, max_length=16)
    summary = summarize_data(pairs, stats, max_length=16, load_report=report)
    assert summary.rows_read == 7 and summary.pairs == 5
    assert summary.skipped == {"invalid JSON": 1, "empty field": 1}
    assert summary.duplicates == 1
    assert summary.prompts_truncated == 3 and summary.pairs_truncated == 3
    assert summary.longest_prompt_cut == len(TOK.encode(long_prompt, add_special_tokens=False))
    assert summary.truncated_fraction == pytest.approx(3 / 5)
    assert summary.truncated_fraction > TRUNCATION_WARNING_FRACTION
    text = summary.format()
    assert "rows read        7" in text and "pairs kept       5" in text
    assert "skipped          2: " in text and "1 invalid JSON" in text and "1 empty field" in text
    assert f"3 prompts (longest {summary.longest_prompt_cut} tokens)" in text and "to max_length=16" in text
    assert text.splitlines()[-1].startswith("warning: 60.0% of the pairs were truncated to max_length=16")


def test_token_counts_and_no_warning_when_nothing_is_cut():
    pairs = [TokenizedPair(tuple(range(1, 1 + p)), (5,) * c, (6,) * r, i)
             for i, (p, c, r) in enumerate([(3, 2, 1), (5, 1, 1), (2, 4, 4), (7, 3, 2)])]
    stats = type("Stats", (), {"rows": 4, "dropped": {}, "prompts_truncated": 0, "completions_truncated": 0,
                               "pairs_truncated": 0, "longest_prompt_cut": 0, "longest_completion_cut": 0})()
    summary = summarize_data(pairs, stats, max_length=64)
    totals = sorted(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)  # 6, 7, 10, 12
    assert summary.tokens_mean == sum(totals) / 4 and summary.tokens_max == 12
    assert summary.tokens_p95 == 12  # nearest rank: ceil(0.95 * 4) = 4th value
    assert summary.warnings == [] and "warning" not in summary.format()
    assert "truncated        0 (max_length=64)" in summary.format()


def test_padding_share_of_the_padded_layout_matches_counting_by_hand():
    pairs = [TokenizedPair((1,) * p, (2,) * c, (3,) * r, i)
             for i, (p, c, r) in enumerate([(3, 2, 1), (5, 1, 1), (2, 4, 4)])]
    share, batches = layout_padding(pairs, "padded", pairs_per_batch=3)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert batches == 1 and share == pytest.approx(1 - real / (2 * len(pairs) * longest))
    summary = summarize_data(pairs, tokenize_dataset(TOK, [], max_length=8)[1], max_length=8, layout="padded",
                             pairs_per_batch=3)
    assert summary.padding_fraction == pytest.approx(share)
    assert f"padded: {share:.1%} of the batch positions are padding (first 1 micro-batches)" in summary.format()
