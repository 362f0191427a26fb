"""Tests for `dpo-fast synth`: sampling, dedupe, scorers (against float64 plain forwards), pairing, writing."""

from __future__ import annotations

import json
import os
import random
import sys
import types

import pytest
import torch
from helpers import assert_close

from dpo_fast.commands import synth as synth_command
from dpo_fast.data.formats import load_preferences
from dpo_fast.demo import tasks
from dpo_fast.demo.setup import TaskCodec, demo_prompts
from dpo_fast.evaluation.synth import (
    PAIRINGS,
    ConfidenceScorer,
    ImplicitRewardScorer,
    Response,
    ScorerError,
    TextCodec,
    generate_completions,
    make_scorer,
    pair_indices,
    read_prompts,
    sequence_logps,
    synthesize,
    unique_responses,
)

PROMPTS = ["sort 3 1 2 =", "sort 5 0 7 =", "sort 9 4 6 8 =", "sort 2 8 1 ="]


def tiny_llama(tokenizer, seed: int = 0, *, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tasks.build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


def naive_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """float64 oracle: one unpadded forward per sequence, full logits, log-softmax in float64."""
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        ids = torch.tensor([list(p) + list(c)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].double()
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(list(c))[:, None]).sum())
    return torch.stack(out)


class HabitSampler(torch.nn.Module):
    """A stand-in sampling model for the sorting task: each sample is the correct answer or the
    'swap_last' mistake, drawn from torch's RNG (so `generate_completions`' seeding applies), + EOS.

    It follows `model.generate`'s contract (left-padded [B, T] in, [B, T + new] out, pad after EOS);
    what a real model does inside `generate` is covered by the tiny-Llama tests.
    """

    def __init__(self, tokenizer, p_correct: float = 0.5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.p_correct = tokenizer, p_correct

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            good = bool(torch.rand(()) < self.p_correct)
            answer = tasks.correct_answer(prompt) if good else tasks.corrupt(prompt, "swap_last", random.Random(0))
            rows.append(tasks.encode_completion(self.tokenizer, answer)[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for r, ids in enumerate(rows):
            new[r, :len(ids)] = torch.tensor(ids)
        return torch.cat([input_ids, new], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Pairing and dedupe
# ---------------------------------------------------------------------------------------------------------


def test_best_vs_worst_picks_first_max_and_first_min():
    assert pair_indices([0.5, 2.0, -1.0, 2.0, -1.0], "best_vs_worst") == [(1, 2)]


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_ties_and_single_responses_give_no_pair(pairing):
    assert pair_indices([1.0, 1.0, 1.0], pairing, rng=random.Random(0)) == []
    assert pair_indices([3.0], pairing, rng=random.Random(0)) == []
    assert pair_indices([], pairing, rng=random.Random(0)) == []


def test_best_vs_random_draws_only_strictly_lower_and_is_seeded():
    scores = [0.0, 3.0, 1.0, 3.0, 2.0, -5.0]
    drawn = {pair_indices(scores, "best_vs_random", rng=random.Random(seed))[0] for seed in range(60)}
    assert {b for _, b in drawn} == {0, 2, 4, 5}  # every strictly lower response, never the other 3.0
    assert {a for a, _ in drawn} == {1}
    assert (pair_indices(scores, "best_vs_random", rng=random.Random(7))
            == pair_indices(scores, "best_vs_random", rng=random.Random(7)))


def test_all_pairs_above_margin_matches_brute_force():
    rng = random.Random(3)
    for _ in range(20):
        scores = [rng.choice([0.0, 0.5, 1.0, 2.5]) for _ in range(rng.randint(2, 6))]
        margin = rng.choice([0.0, 0.5, 1.0])
        got = pair_indices(scores, "all_pairs_above_margin", margin=margin)
        expected = {(i, j) for i, a in enumerate(scores) for j, b in enumerate(scores) if a - b > margin}
        assert set(got) == expected and len(got) == len(expected)


def test_unknown_pairing_is_named():
    with pytest.raises(ValueError, match="pairing='best_of_all' is not known"):
        pair_indices([1.0, 0.0], "best_of_all")


def test_unique_responses_drops_repeats_and_empties():
    samples = [Response(t, (i,)) for i, t in enumerate([" 1 2", " 1 2", "", "  ", " 2 1", " 1 2 "])]
    kept, empty = unique_responses(samples)
    assert [r.text for r in kept] == [" 1 2", " 2 1", " 1 2 "] and [r.ids for r in kept] == [(0,), (4,), (5,)]
    assert empty == 2


# ---------------------------------------------------------------------------------------------------------
# Sampling and the model-based scorers
# ---------------------------------------------------------------------------------------------------------


def test_left_padded_batches_sample_what_each_prompt_samples_alone(model, tokenizer):
    codec = TaskCodec(tokenizer)
    ids = [codec.encode_prompt(p) for p in PROMPTS]
    kwargs = dict(eos_token_id=codec.eos_token_id, pad_token_id=codec.pad_token_id, do_sample=False,
                  max_new_tokens=6)
    batched = generate_completions(model, ids, batch_size=4, **kwargs)
    alone = [generate_completions(model, [p], batch_size=1, **kwargs)[0] for p in ids]
    assert batched == alone
    for group in batched:
        (c,) = group
        assert 1 <= len(c) <= 6 and (codec.eos_token_id not in c[:-1])


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tokenizer):
    codec = TaskCodec(tokenizer)
    ids = [codec.encode_prompt(p) for p in PROMPTS[:2]]
    kwargs = dict(eos_token_id=codec.eos_token_id, pad_token_id=codec.pad_token_id, n=3, max_new_tokens=5)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = generate_completions(model, ids, seed=5, **kwargs)
    after = torch.rand(3)
    assert torch.equal(before, after)
    assert first == generate_completions(model, ids, seed=5, **kwargs)
    assert first != generate_completions(model, ids, seed=6, **kwargs)


def test_sequence_logps_matches_float64_forward(model, tokenizer):
    rng = random.Random(0)
    codec = TaskCodec(tokenizer)
    prompt_ids, completion_ids = [], []
    for p in PROMPTS[:3]:
        for _ in range(rng.choice([1, 2, 3])):  # odd counts: a leftover paired with itself
            prompt_ids.append(codec.encode_prompt(p))
            completion_ids.append([rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(1, 7))])
    got = sequence_logps(model, prompt_ids, completion_ids, pad_token_id=0)
    assert_close(got, naive_logps(model, prompt_ids, completion_ids), torch.float32, "sequence_logps")


def test_confidence_is_mean_token_logp_of_the_sampled_ids(model, tokenizer):
    codec = TaskCodec(tokenizer)
    prompt_ids = [codec.encode_prompt(p) for p in PROMPTS[:2]]
    responses = [[Response("a", (5, 6, 2)), Response("b", (7,)), Response("c", (8, 9))], [Response("d", (14, 5))]]
    got = ConfidenceScorer(model, prompt_ids, 0).score(PROMPTS[:2], responses)
    flat = [(i, r) for i, g in enumerate(responses) for r in g]
    expected = naive_logps(model, [prompt_ids[i] for i, _ in flat], [r.ids for _, r in flat])
    expected = expected / torch.tensor([len(r.ids) for _, r in flat], dtype=torch.float64)
    assert [len(g) for g in got] == [3, 1]
    assert_close(torch.tensor([v for g in got for v in g]), expected, torch.float32, "confidence")


def test_implicit_reward_scorer_matches_float64_reference(tmp_path, tokenizer):
    policy, reference = tiny_llama(tokenizer, seed=1), tiny_llama(tokenizer, seed=2)
    policy.save_pretrained(tmp_path / "policy")
    reference.save_pretrained(tmp_path / "ref")
    codec = TaskCodec(tokenizer)
    scorer = make_scorer(f"implicit:{tmp_path / 'policy'},{tmp_path / 'ref'}", codec=codec, beta=0.3)
    assert isinstance(scorer, ImplicitRewardScorer)
    responses = [[Response(" 1 2 3", ()), Response(" 1 3 2", ()), Response(" 3", ())], [Response(" 0 5 7", ())]]
    got = scorer.score(PROMPTS[:2], responses)
    prompt_ids = [codec.encode_prompt(p) for p, g in zip(PROMPTS, responses) for _ in g]
    completion_ids = [codec.encode_completion(p, r.text) for p, g in zip(PROMPTS, responses) for r in g]
    expected = 0.3 * (naive_logps(policy, prompt_ids, completion_ids) - naive_logps(reference, prompt_ids,
                                                                                     completion_ids))
    assert_close(torch.tensor([v for g in got for v in g], dtype=torch.float64), expected, torch.float32,
                 "implicit reward")


def test_reward_model_scorer_reads_the_last_real_token(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(4)
    rm = LlamaForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = make_scorer(f"reward-model:{tmp_path / 'rm'}")
    responses = [[Response(" 1 2 3", ()), Response(" 1", ())], [Response(" 0 5 7 1 1", ())]]
    got = [v for g in scorer.score(PROMPTS[:2], responses) for v in g]
    expected = []
    for p, group in zip(PROMPTS, responses):
        for r in group:
            ids = torch.tensor([tokenizer.encode(p + r.text, add_special_tokens=True)])
            with torch.no_grad():
                expected.append(rm(input_ids=ids).logits[0, -1].double())
    assert_close(torch.tensor(got, dtype=torch.float64), torch.stack(expected), torch.float32, "reward model")


def test_text_codec_follows_tokenize_pair(tokenizer):
    from dpo_fast.data.tokenization import tokenize_pair

    codec = TextCodec(tokenizer)
    pair = tokenize_pair(tokenizer, {"prompt": "sort 2 1 3 =", "chosen": " 1 2 3", "rejected": " 3"})
    assert tuple(codec.encode_prompt("sort 2 1 3 =")) == pair.prompt_ids
    assert tuple(codec.encode_completion("sort 2 1 3 =", " 1 2 3")) == pair.chosen_ids


# ---------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------


def test_verifier_pairs_chosen_verify_and_rejected_do_not(tmp_path, tokenizer):
    prompts = demo_prompts(limit=24)
    result = synthesize(HabitSampler(tokenizer), tokenizer, prompts, scorer="dpo_fast.demo.tasks:verify", n=4,
                        max_new_tokens=12, seed=0, batch_size=7, codec=TaskCodec(tokenizer))
    report = result.report
    assert report.pairs == len(result.rows) > 0
    # n=4 samples of a 50/50 habit: some prompts saw only one kind of answer (after dedupe, one response).
    assert report.no_pair == report.prompts - report.pairs == report.single_response > 0
    assert report.sampled == 96 and report.unique == sum(len(g) for g in result.responses)
    for row in result.rows:
        assert tasks.verify(row["prompt"], row["chosen"]) and not tasks.verify(row["prompt"], row["rejected"])
        assert (row["score_chosen"], row["score_rejected"]) == (1.0, 0.0)
    path = tmp_path / "out.jsonl"
    from dpo_fast.evaluation.synth import write_jsonl

    write_jsonl(str(path), result.rows)
    loaded = load_preferences(str(path))
    assert loaded["prompt"] == [r["prompt"] for r in result.rows]
    assert loaded["chosen"] == [r["chosen"] for r in result.rows]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_all_pairs_count_ties_and_length_scorer(tokenizer, model):
    # An untrained model's samples differ in length: "length" ranks them; n=3 gives up to 3 pairs.
    result = synthesize(model, tokenizer, PROMPTS, scorer="length", n=3, pairing="all_pairs_above_margin",
                        max_new_tokens=6, seed=1, codec=TaskCodec(tokenizer))
    for row in result.rows:
        assert len(row["chosen"]) > len(row["rejected"])
    expected = sum(sum(len(a.text) > len(b.text) for a in g for b in g) for g in result.responses)
    assert result.report.pairs == expected
    ties = sum(len(g) >= 2 and len({len(r.text) for r in g}) == 1 for g in result.responses)
    assert result.report.ties == ties


def _raises(prompt, response):
    raise RuntimeError("judge offline")


def _returns_string(prompt, response):
    return "good"


def _returns_nan(prompt, response):
    return float("nan")


@pytest.fixture
def scorer_module(monkeypatch):
    module = types.ModuleType("synth_test_scorers")
    module.raises, module.string, module.nan = _raises, _returns_string, _returns_nan
    monkeypatch.setitem(sys.modules, "synth_test_scorers", module)
    return module


@pytest.mark.parametrize("name, message", [
    ("raises", r"scorer 'synth_test_scorers:raises' raised RuntimeError: judge offline on prompt 0"),
    ("string", r"scorer 'synth_test_scorers:string' returned 'good' \(str\) for prompt 0"),
    ("nan", r"scorer 'synth_test_scorers:nan' returned nan \(float\) for prompt 0"),
])
def test_bad_scorer_is_named_with_prompt_and_value(scorer_module, tokenizer, name, message):
    with pytest.raises(ScorerError, match=message):
        synthesize(HabitSampler(tokenizer), tokenizer, PROMPTS, scorer=f"synth_test_scorers:{name}", n=2,
                   max_new_tokens=8, codec=TaskCodec(tokenizer))


@pytest.mark.parametrize("spec, message", [
    ("nope", "scorer 'nope' is not known"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("dpo_fast.demo.tasks:missing", "has no attribute 'missing'"),
    ("dpo_fast.demo.tasks:TASK_CHARS", "not a callable"),
    ("implicit:only_one", "expected 'implicit:POLICY,REF'"),
])
def test_bad_scorer_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        make_scorer(spec)


# ---------------------------------------------------------------------------------------------------------
# Prompt files and the command
# ---------------------------------------------------------------------------------------------------------


def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("sort 1 2 3 =\n\n  \nsort 3 2 1 =\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["sort 1 2 3 =", "sort 3 2 1 ="]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a", [{"role": "user", "content": "b"}]]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 2: expected a record with a non-empty 'prompt'"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt' holds no prompt"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.txt"))
    assert len(demo_prompts(limit=5)) == 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, model):
    path = tmp_path_factory.mktemp("synth_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli(argv):
    import argparse

    parser = argparse.ArgumentParser()
    synth_command.add_arguments(parser)
    return synth_command.run(parser.parse_args(argv))


def test_command_writes_a_loadable_dataset(tmp_path, model_dir, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "data" / "pairs.jsonl"
    status = _cli(["--model", str(model_dir), "--prompts", str(tmp_path / "p.txt"), "--n", "3", "--scorer", "length",
                   "--pairing", "best_vs_random", "--output", str(out), "--max-new-tokens", "6", "--seed", "2",
                   "--batch-size", "5"])
    assert status == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert len(load_preferences(str(out))) == len(rows)
    assert f"wrote {len(rows)} pairs" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["empty prompts", "scorer raises", "scorer string", "unknown scorer"])
def test_command_bad_input_writes_nothing(tmp_path, model_dir, scorer_module, capsys, case):
    prompts = tmp_path / "p.txt"
    prompts.write_text("" if case == "empty prompts" else "\n".join(PROMPTS))
    scorer = {"scorer raises": "synth_test_scorers:raises", "scorer string": "synth_test_scorers:string",
              "unknown scorer": "best"}.get(case, "length")
    out = tmp_path / "out.jsonl"
    status = _cli(["--model", str(model_dir), "--prompts", str(prompts), "--scorer", scorer, "--output", str(out),
                   "--max-new-tokens", "4", "--n", "2"])
    err = capsys.readouterr().err
    assert status == 2
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["p.txt"]
    expected = {"empty prompts": "holds no prompt", "scorer raises": "raised RuntimeError: judge offline on prompt 0",
                "scorer string": "returned 'good' (str) for prompt 0", "unknown scorer": "scorer 'best' is not known"}
    assert expected[case] in err and "dpo-fast synth:" in err


def test_command_unknown_pairing(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(["--model", str(model_dir), "--prompts", "demo", "--scorer", "length", "--pairing", "best_vs_each",
              "--output", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'best_vs_each'" in capsys.readouterr().err
    # The same through run() with a namespace built elsewhere (dpo_fast.commands.main's).
    args = types.SimpleNamespace(pairing="best_vs_each", n=4, max_new_tokens=8, batch_size=4, temperature=1.0,
                                 top_p=1.0, output=str(tmp_path / "o.jsonl"))
    assert synth_command.run(args) == 2
    assert "pairing 'best_vs_each' is not known" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, codec_class", [([], TextCodec), (["--encoding", "task"], TaskCodec)])
def test_command_encoding_picks_the_codec(tmp_path, model_dir, tokenizer, monkeypatch, flags, codec_class):
    import dpo_fast.evaluation.synth as synth_module

    seen = {}

    def fake_synthesize(model, tokenizer, prompts, *, codec, **kwargs):
        seen["codec"] = codec
        raise ValueError("stop here")

    monkeypatch.setattr(synth_module, "synthesize", fake_synthesize)
    status = _cli(["--model", str(model_dir), "--prompts", "demo", "--limit", "2", "--scorer", "length",
                   "--output", str(tmp_path / "o.jsonl"), *flags])
    assert status == 2 and type(seen["codec"]) is codec_class
    # BOS + characters either way: the task tokenizer's post-processor adds the BOS the task encoding adds.
    expected = tasks.encode_prompt(tokenizer, "sort 1 2 3 =")
    assert expected[0] == tokenizer.bos_token_id
    assert seen["codec"].encode_prompt("sort 1 2 3 =") == expected
