"""The sorting preference task (tokenizer, verifier, mistakes, splits, eval helpers) and a smoke run of the demo."""

import argparse
import json
import math
import random

import pytest
import torch
from torch import nn

from dpo_fast.data.pairs import IGNORE_INDEX
from dpo_fast.demo import tasks


@pytest.fixture(scope="module")
def tokenizer():
    return tasks.build_tokenizer()


def _random_prompts(n, seed=0):
    rng = random.Random(seed)
    return [tasks.format_prompt(rng.sample(range(10), rng.randint(3, 6))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_is_one_id_per_character_and_round_trips(tokenizer):
    for text in _random_prompts(20) + [" 0 1 2 9", "sort 9 8 7 ="]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert len(specials) == 4
    assert len(tokenizer) == 4 + len(set(tasks.TASK_CHARS))


def test_tokenizer_maps_unknown_characters_to_unk(tokenizer):
    assert tokenizer.encode("x", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_encode_prompt_and_completion_add_bos_and_eos(tokenizer):
    p = tasks.encode_prompt(tokenizer, "sort 2 1 3 =")
    c = tasks.encode_completion(tokenizer, " 1 2 3")
    assert p[0] == tokenizer.bos_token_id and tokenizer.decode(p[1:]) == "sort 2 1 3 ="
    assert c[-1] == tokenizer.eos_token_id and tokenizer.decode(c[:-1]) == " 1 2 3"
    assert tasks.decode_completion(tokenizer, c) == " 1 2 3"


# ---------------------------------------------------------------------------------------------------------
# Task and verifier


def test_prompt_format_and_parse():
    assert tasks.format_prompt((3, 1, 2)) == "sort 3 1 2 ="
    assert tasks.parse_prompt("sort 3 1 2 =") == (3, 1, 2)
    assert tasks.correct_answer("sort 3 1 2 =") == " 1 2 3"


@pytest.mark.parametrize("bad", ["", "sort =", "sort 3 1 2", "sort 31 2 =", "sort 3 a 2 =", "3 1 2 ="])
def test_parse_prompt_rejects_malformed_prompts(bad):
    with pytest.raises(ValueError, match="sorting prompt"):
        tasks.parse_prompt(bad)


def test_verify_accepts_exactly_the_sorted_digits():
    for prompt in _random_prompts(50, seed=1):
        digits = tasks.parse_prompt(prompt)
        assert tasks.verify(prompt, tasks.format_answer(sorted(digits)))
        assert tasks.verify(prompt, " " + tasks.format_answer(sorted(digits)) + " ")  # whitespace ignored
        assert not tasks.verify(prompt, tasks.format_answer(sorted(digits, reverse=True)))
        assert not tasks.verify(prompt, tasks.format_answer(sorted(digits)[:-1]))
        assert not tasks.verify(prompt, "")


def test_corrupt_makes_the_announced_mistake_and_never_a_correct_answer():
    rng = random.Random(3)
    for prompt in _random_prompts(100, seed=2):
        right = sorted(tasks.parse_prompt(prompt))
        for kind in tasks.ERROR_KINDS:
            wrong_text = tasks.corrupt(prompt, kind, rng)
            assert not tasks.verify(prompt, wrong_text), (prompt, kind, wrong_text)
            wrong = [int(t) for t in wrong_text.split()]
            assert len(wrong) == len(right)
            diff = [i for i in range(len(right)) if wrong[i] != right[i]]
            if kind == "swap_last":
                assert diff == [len(right) - 2, len(right) - 1] and wrong[-2:] == right[-2:][::-1]
            elif kind == "swap":
                assert len(diff) == 2 and diff[1] == diff[0] + 1 and diff[1] < len(right) - 1
                assert sorted(wrong) == right
            else:
                assert len(diff) == 1 and abs(wrong[diff[0]] - right[diff[0]]) == 1
                assert 0 <= wrong[diff[0]] <= 9


def test_corrupt_rejects_unknown_kinds_and_short_lists():
    with pytest.raises(ValueError, match="kind='typo'"):
        tasks.corrupt("sort 3 1 2 =", "typo", random.Random(0))
    with pytest.raises(ValueError, match="at least 3"):
        tasks.corrupt("sort 3 1 =", "swap", random.Random(0))


def test_make_prompts_splits_are_disjoint_valid_and_seeded():
    splits = tasks.make_prompts(300, 50, seed=5, min_len=3, max_len=4)
    assert len(splits.train) == 300 and len(splits.held_out) == 50
    assert not set(splits.train) & set(splits.held_out)
    assert len(set(splits.train)) == 300
    for prompt in splits.train + splits.held_out:
        digits = tasks.parse_prompt(prompt)
        assert 3 <= len(digits) <= 4 and len(set(digits)) == len(digits)
    assert tasks.make_prompts(300, 50, seed=5, min_len=3, max_len=4) == splits
    assert tasks.make_prompts(300, 50, seed=6, min_len=3, max_len=4) != splits


def test_make_prompts_rejects_impossible_requests():
    with pytest.raises(ValueError, match="only 720 exist"):
        tasks.make_prompts(400, 100, seed=0, min_len=3, max_len=3)
    with pytest.raises(ValueError, match="min_len"):
        tasks.make_prompts(10, 10, seed=0, min_len=2, max_len=3)
    with pytest.raises(ValueError, match="num_train"):
        tasks.make_prompts(0, 10, seed=0)


def test_preference_rows_pair_a_correct_answer_with_a_wrong_one():
    prompts = _random_prompts(200, seed=4)
    rows = tasks.make_preference_rows(prompts, seed=0)
    assert [r.prompt for r in rows] == prompts
    assert all(tasks.verify(r.prompt, r.chosen) and not tasks.verify(r.prompt, r.rejected) for r in rows)
    habit = sum(r.rejected == tasks.corrupt(r.prompt, "swap_last", random.Random(0)) for r in rows)
    assert 0.4 < habit / len(rows) < 0.8  # default mix: 60% of the mistakes are the habit
    only_habit = tasks.make_preference_rows(prompts, seed=0, error_mix={"swap_last": 1.0})
    assert all(r.rejected == tasks.corrupt(r.prompt, "swap_last", random.Random(0)) for r in only_habit)
    with pytest.raises(ValueError, match="unknown kinds"):
        tasks.make_preference_rows(prompts, seed=0, error_mix={"typo": 1.0})


def test_tokenize_row_matches_the_encoders(tokenizer):
    row = tasks.PreferenceRow("sort 3 1 2 =", " 1 2 3", " 1 3 2")
    pair = tasks.tokenize_row(tokenizer, row, index=7)
    assert pair.index == 7
    assert list(pair.prompt_ids) == tasks.encode_prompt(tokenizer, row.prompt)
    assert list(pair.chosen_ids) == tasks.encode_completion(tokenizer, row.chosen)
    assert list(pair.rejected_ids) == tasks.encode_completion(tokenizer, row.rejected)


def test_pad_sequences_scores_exactly_the_completion_tokens():
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    completions = [[11, 2], [12, 13, 14, 2], [2]]
    ids, labels = tasks.pad_sequences(prompts, completions, pad_id=0)
    assert ids.shape == labels.shape == (3, 6)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        assert ids[r, : len(p) + len(c)].tolist() == p + c
        assert (ids[r, len(p) + len(c):] == 0).all()
        scored = (labels[r] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
        assert scored == list(range(len(p) - 1, len(p) + len(c) - 1))
        assert [int(ids[r, t + 1]) for t in scored] == [int(labels[r, t]) for t in scored] == c
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        tasks.pad_sequences(prompts[:2], completions[:1], pad_id=0)


# ---------------------------------------------------------------------------------------------------------
# Generation and evaluation helpers


class _Oracle(nn.Module):
    """A stand-in causal LM that answers the sorting prompt correctly (or with the habit), token by token."""

    def __init__(self, tokenizer, habit=False):
        super().__init__()
        self.tok, self.habit = tokenizer, habit
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        r, t = input_ids.shape
        logits = torch.zeros(r, t, len(self.tok))
        for i in range(r):
            text = self.tok.decode(input_ids[i].tolist(), skip_special_tokens=True)
            prompt, done = text.split("=", 1)
            prompt += "="
            if self.habit:
                answer = tasks.corrupt(prompt, "swap_last", random.Random(0))
            else:
                answer = tasks.correct_answer(prompt)
            if len(done) < len(answer):
                nxt = self.tok.convert_tokens_to_ids(answer[len(done)])
            else:
                nxt = self.tok.eos_token_id
            logits[i, -1, nxt] = 5.0
        return type("Out", (), {"logits": logits})()


def test_generate_greedy_with_an_oracle_scores_full_accuracy(tokenizer):
    prompts = _random_prompts(12, seed=8)
    oracle = _Oracle(tokenizer)
    completions = tasks.generate(oracle, tokenizer, prompts, max_new_tokens=16, batch_size=2)
    assert completions == [tasks.correct_answer(p) for p in prompts]
    assert tasks.exact_match_accuracy(prompts, completions) == 1.0
    wrong = tasks.generate(_Oracle(tokenizer, habit=True), tokenizer, prompts, max_new_tokens=16)
    assert tasks.exact_match_accuracy(prompts, wrong) == 0.0
    ids = tasks.generate_ids(oracle, tokenizer, prompts[:3], max_new_tokens=16)
    assert all(seq[-1] == tokenizer.eos_token_id for seq in ids)


def test_generate_stops_at_max_new_tokens(tokenizer):
    ids = tasks.generate_ids(_Oracle(tokenizer), tokenizer, ["sort 5 4 3 2 1 ="], max_new_tokens=3)
    assert len(ids[0]) == 3 and tokenizer.decode(ids[0]) == " 1 "
    with pytest.raises(ValueError, match="max_new_tokens"):
        tasks.generate_ids(_Oracle(tokenizer), tokenizer, ["sort 1 2 3 ="], max_new_tokens=0)


def test_exact_match_accuracy_counts_and_checks_lengths():
    prompts = ["sort 3 1 2 =", "sort 5 4 6 ="]
    assert tasks.exact_match_accuracy(prompts, [" 1 2 3", " 4 6 5"]) == 0.5
    with pytest.raises(ValueError, match="as many completions"):
        tasks.exact_match_accuracy(prompts, [" 1 2 3"])


def _tiny_llama(tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def _plain_completion_logp(model, tokenizer, prompt, completion):
    """float64 log-prob of one completion from one unpadded forward."""
    p = tasks.encode_prompt(tokenizer, prompt)
    c = tasks.encode_completion(tokenizer, completion)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) - 1 + k, tok]) for k, tok in enumerate(c))


def test_completion_logps_match_unpadded_float64_forwards(tokenizer):
    model = _tiny_llama(tokenizer, 0)
    prompts = _random_prompts(5, seed=9)
    completions = [" 1", " 0 1 2 3 4 5 6", "", " 9 9", " 3 1"]
    got = tasks.completion_logps(model, tokenizer, prompts, completions, batch_size=2)
    want = torch.tensor([_plain_completion_logp(model, tokenizer, p, c) for p, c in zip(prompts, completions)],
                        dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_preference_metrics_and_kl_against_plain_computation(tokenizer):
    policy, reference = _tiny_llama(tokenizer, 1), _tiny_llama(tokenizer, 2)
    rows = tasks.make_preference_rows(_random_prompts(6, seed=10), seed=1)
    beta = 0.3
    m = tasks.preference_metrics(policy, reference, tokenizer, rows, beta=beta)
    chosen = [beta * (_plain_completion_logp(policy, tokenizer, r.prompt, r.chosen)
                      - _plain_completion_logp(reference, tokenizer, r.prompt, r.chosen)) for r in rows]
    rejected = [beta * (_plain_completion_logp(policy, tokenizer, r.prompt, r.rejected)
                        - _plain_completion_logp(reference, tokenizer, r.prompt, r.rejected)) for r in rows]
    assert m.reward_accuracy == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(rows))
    assert m.margin == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / len(rows), abs=1e-4)
    assert m.chosen_reward == pytest.approx(sum(chosen) / len(rows), abs=1e-4)

    prompts = [r.prompt for r in rows]
    sampled = tasks.generate_ids(policy, tokenizer, prompts, max_new_tokens=5, greedy=False,
                                 generator=torch.Generator().manual_seed(0))
    kl = tasks.mean_token_kl(policy, reference, tokenizer, prompts, sampled)
    num, den = 0.0, 0
    for p, ids in zip(prompts, sampled):
        pid = tasks.encode_prompt(tokenizer, p)
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([pid + ids])).logits[0].double(), -1)
            num += sign * sum(float(logp[len(pid) - 1 + k, t]) for k, t in enumerate(ids))
        den += len(ids)
    assert kl == pytest.approx(num / den, abs=1e-5)


def test_identical_models_have_no_reward_no_margin_and_no_kl(tokenizer):
    model = _tiny_llama(tokenizer, 3)
    rows = tasks.make_preference_rows(_random_prompts(4, seed=11), seed=2)
    m = tasks.preference_metrics(model, model, tokenizer, rows, beta=0.1)
    assert (m.reward_accuracy, m.margin) == (0.0, 0.0)
    prompts = [r.prompt for r in rows]
    sampled = tasks.generate_ids(model, tokenizer, prompts, max_new_tokens=4, greedy=False,
                                 generator=torch.Generator().manual_seed(1))
    assert tasks.mean_token_kl(model, model, tokenizer, prompts, sampled) == 0.0
    with pytest.raises(ValueError, match="all empty"):
        tasks.mean_token_kl(model, model, tokenizer, prompts, [[] for _ in prompts])


# ---------------------------------------------------------------------------------------------------------
# The demo, end to end on the quick setting


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from dpo_fast.commands import main as cli

    out = tmp_path_factory.mktemp("demo")
    status = cli.main(["demo", "--quick", "--output-dir", str(out), "--seed", "3", "--dpo-steps", "2"])
    return status, out


def test_demo_quick_run_writes_its_outputs(quick_run, capsys):
    status, out = quick_run
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == 3 and summary["config"]["dpo_steps"] == 2
    assert summary["seconds"] > 0
    for when in ("before", "after"):
        for key in ("accuracy", "reward_accuracy", "margin", "kl"):
            assert math.isfinite(summary[when][key]), (when, key)
        assert 0.0 <= summary[when]["accuracy"] <= 1.0
    # Before DPO the policy is its reference: every log-ratio is exactly 0.
    assert summary["before"]["reward_accuracy"] == 0.0
    assert summary["before"]["margin"] == 0.0 and summary["before"]["kl"] == 0.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in records}
    assert phases == {"sft", "dpo", "eval"}
    assert [r["when"] for r in records if r["phase"] == "eval"] == ["before_dpo", "after_dpo"]
    assert max(r["step"] for r in records if r["phase"] == "dpo") == 2
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


def test_demo_outputs_feed_score_and_rank(quick_run):
    """The saved SFT model, DPO model and held-out pairs reproduce the demo's own reward accuracy."""
    from dpo_fast.commands import score

    status, out = quick_run
    assert status == 0
    rows = [json.loads(line) for line in (out / "heldout_pairs.jsonl").read_text().splitlines()]
    assert rows and all(tasks.verify(r["prompt"], r["chosen"]) and not tasks.verify(r["prompt"], r["rejected"])
                        for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args = parser.parse_args(["--model", str(out / "dpo" / "final"), "--ref-model", str(out / "sft"),
                              "--data", str(out / "heldout_pairs.jsonl"), "--beta", str(summary["config"]["beta"]),
                              "--max-length", "64", "--output", str(out / "scores.jsonl")])
    assert score.run(args) == 0
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    accuracy = sum(r["correct"] for r in scored) / len(scored)
    assert len(scored) == len(rows)
    assert accuracy == pytest.approx(summary["after"]["reward_accuracy"], abs=1e-9)


def test_demo_rejects_bad_settings(tmp_path, capsys):
    from dpo_fast.commands import demo

    assert demo.main(["--quick", "--sft-steps", "-1", "--output-dir", str(tmp_path)]) == 2
    assert "sft_steps must be >= 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="dpo_pairs=5000"):
        demo.DemoSettings(dpo_pairs=5000)
