"""Implicit rewards against a float64 oracle, and the statistics behind scoring and ranking.

Oracle: one unpadded forward per (prompt + response) sequence through `model(...).logits`, a float64
log-softmax, the response tokens' log-probs summed; reward = beta * (policy - reference). The ids the
oracle scores come from `tokenize_pair` on a real pair (the response as chosen, another response as
rejected), so the test also checks that `implicit_rewards` tokenizes a lone response exactly as the
chosen side of a pair.

Tolerance (float32 models): a sequence log-prob L from the fused path and from the oracle differ by float32
round-off of the forward, about 1e-5 * |L| (the `helpers.TOLERANCES` float32 row, whose atol scales with
the largest magnitude). A reward is beta times the difference of two such log-probs, so its allowed error
is beta * 2 * 1e-5 * max|L|, plus rtol 1e-5 of the reward.
"""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.data.tokenization import tokenize_pair  # noqa: E402
from dpo_fast.evaluation import rewards as evaluation  # noqa: E402
from dpo_fast.evaluation.rewards import (
    bootstrap_means,
    bradley_terry,
    implicit_rewards,
    percentile_interval,
    score_pairs,
    wilson_interval,
)

BETA = 0.3
MAX_LENGTH = 48
RTOL = 1e-5  # float32 round-off, relative (helpers.TOLERANCES[torch.float32] scaled as described above)


def tiny_llama(vocab_size: int, seed: int, *, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    # Random-init logits are nearly flat; a larger head spreads them so that rewards differ between tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_llama(len(tokenizer), 0), tiny_llama(len(tokenizer), 1)


TEXT_ROWS = [  # (prompt, response); rows 0-1 and 3-4 share a prompt, row 2's response is the first filler
    ("Human: write a poem about the sun\n\nAssistant:", " the sun is blue and the moon sat on a mat."),
    ("Human: write a poem about the sun\n\nAssistant:", " sorry, no poem."),
    ("Explain python code:", "0"),
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " house because the dog sat on the mat, thanks!"),
]
CHAT_ROWS = [
    ([{"role": "user", "content": "hello, please write a story"}], "sure: one cat, two dogs."),
    ([{"role": "system", "content": "think"}, {"role": "user", "content": "number seven?"}], "eleven"),
    ([{"role": "user", "content": "hello, please write a story"}], "no"),
]


@torch.no_grad()
def oracle_token_logps(model, prompt_ids, response_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)


def expected_ids(tokenizer, rows):
    """(prompt ids, response ids) of each row as the chosen side of a pair with another real response."""
    out = []
    for i, (prompt, response) in enumerate(rows):
        other = rows[(i + 1) % len(rows)][1]
        other = other if other != response else response + " yes"
        pair = tokenize_pair(tokenizer, {"prompt": prompt, "chosen": response, "rejected": other},
                             max_length=MAX_LENGTH)
        out.append((pair.prompt_ids, pair.chosen_ids))
    return out


def assert_rewards_close(got: torch.Tensor, expected: torch.Tensor, scale: float, name: str) -> None:
    """|got - expected| <= RTOL * |expected| + BETA * 2 * RTOL * scale (see the module docstring)."""
    atol = BETA * 2 * RTOL * scale
    bad = (got.double() - expected).abs() > RTOL * expected.abs() + atol
    assert not bool(bad.any()), (f"{name}: {int(bad.sum())} rewards off (atol {atol:.3g}): got "
                                 f"{got[bad].tolist()}, expected {expected[bad].tolist()}")


@pytest.mark.parametrize("kind", ["text", "chat"])
@pytest.mark.parametrize("reference_free", [False, True])
def test_implicit_rewards_match_float64_oracle(tokenizer, models, kind, reference_free):
    model, ref = models
    rows = TEXT_ROWS if kind == "text" else CHAT_ROWS
    prompts, responses = [r[0] for r in rows], [r[1] for r in rows]
    ref_model = None if reference_free else ref
    got = implicit_rewards(model, ref_model, tokenizer, prompts, responses, beta=BETA, max_length=MAX_LENGTH)
    per_token = implicit_rewards(model, ref_model, tokenizer, prompts, responses, beta=BETA, per_token=True,
                                 max_length=MAX_LENGTH)
    assert got.dtype == torch.float32 and got.shape == (len(rows),)
    expected, expected_tokens, scale = [], [], 0.0
    for prompt_ids, response_ids in expected_ids(tokenizer, rows):
        policy = oracle_token_logps(model, prompt_ids, response_ids)
        reference = torch.zeros_like(policy) if reference_free else oracle_token_logps(ref, prompt_ids,
                                                                                        response_ids)
        expected_tokens.append(BETA * (policy - reference))
        expected.append(float(expected_tokens[-1].sum()))
        scale = max(scale, float(policy.sum().abs()), float(reference.sum().abs()))
    expected = torch.tensor(expected, dtype=torch.float64)
    assert_rewards_close(got, expected, scale, f"{kind} sequence rewards")
    assert len(per_token) == len(rows)
    for i, (tokens, want) in enumerate(zip(per_token, expected_tokens)):
        assert tokens.dtype == torch.float32 and tokens.shape == want.shape, f"row {i}: token count"
        # One token's log-prob is at most log V in magnitude.
        assert_rewards_close(tokens, want, math.log(len(tokenizer)) * 4, f"{kind} row {i} per-token rewards")
    sums = torch.stack([t.double().sum() for t in per_token])
    assert_rewards_close(got, sums, scale, f"{kind} per-token sums vs sequence rewards")


def test_rewards_agree_with_score_pairs(tokenizer, models):
    """The chosen rewards of score_pairs are implicit_rewards of the chosen responses (two code paths)."""
    model, ref = models
    rows = [{"prompt": p, "chosen": r, "rejected": r + " no"} for p, r in TEXT_ROWS]
    result = score_pairs(model, ref, tokenizer, rows, beta=BETA, max_length=MAX_LENGTH, n_bootstrap=50)
    direct = implicit_rewards(model, ref, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                              beta=BETA, max_length=MAX_LENGTH)
    scale = float(direct.abs().max()) / BETA + 1.0
    assert_rewards_close(result.chosen_rewards, direct.double(), scale, "score_pairs chosen rewards")
    assert torch.equal(result.margins, result.chosen_rewards - result.rejected_rewards) or torch.allclose(
        result.margins.double(), (result.chosen_rewards.double() - result.rejected_rewards.double()),
        rtol=RTOL, atol=1e-6)
    assert result.correct.tolist() == [m > 0 for m in result.margins.tolist()]
    assert result.accuracy == pytest.approx(sum(result.correct.tolist()) / len(rows))
    lo, hi = result.accuracy_ci
    assert lo <= result.accuracy <= hi
    lo, hi = result.margin_ci
    assert lo <= result.mean_margin <= hi
    assert [r["index"] for r in result.records()] == list(range(len(rows)))


def test_policy_equal_to_reference_has_zero_rewards(tokenizer, models):
    model, _ = models
    prompts, responses = [r[0] for r in TEXT_ROWS], [r[1] for r in TEXT_ROWS]
    got = implicit_rewards(model, model, tokenizer, prompts, responses, beta=BETA, max_length=MAX_LENGTH)
    assert torch.equal(got, torch.zeros(len(prompts)))


def test_bad_inputs_raise_clear_errors(tokenizer, models):
    model, ref = models
    other_vocab = tiny_llama(len(tokenizer) + 7, 2)
    with pytest.raises(ValueError, match=r"'model' and 'ref_model' do not share a vocabulary.*"
                                         rf"vocab_size={len(tokenizer)}.*vocab_size={len(tokenizer) + 7}"):
        implicit_rewards(model, other_vocab, tokenizer, ["The cat"], [" sat"], beta=BETA)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        score_pairs(model, other_vocab, tokenizer, [{"prompt": "a", "chosen": " b", "rejected": " c"}],
                    beta=BETA)
    small = tiny_llama(100, 3)
    with pytest.raises(ValueError, match="token id .* outside the vocabulary of 'model'"):
        implicit_rewards(small, None, tokenizer, ["The cat sat on the"], [" mat, thanks"], beta=BETA)
    with pytest.raises(ValueError, match="empty: no pair to score"):
        score_pairs(model, ref, tokenizer, [], beta=BETA)
    with pytest.raises(ValueError, match="nothing to score"):
        implicit_rewards(model, ref, tokenizer, [], [], beta=BETA)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        implicit_rewards(model, ref, tokenizer, ["a", "b"], ["c"], beta=BETA)
    with pytest.raises(ValueError, match=r"responses\[1\] cannot be scored"):
        implicit_rewards(model, ref, tokenizer, ["a", "b"], [" c", ""], beta=BETA)
    with pytest.raises(ValueError, match="beta must be a positive"):
        implicit_rewards(model, ref, tokenizer, ["a"], [" c"], beta=0.0)
    with pytest.raises((FileNotFoundError, OSError), match="not found"):
        score_pairs(model, ref, tokenizer, "/nonexistent/prefs.jsonl", beta=BETA)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("successes,n", [(0, 10), (3, 10), (8, 10), (10, 10), (517, 1000), (1, 3)])
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_wilson_interval_inverts_the_score_test(successes, n, confidence):
    """Wilson's interval is {p : |x/n - p| <= z sqrt(p (1 - p) / n)}: its ends solve the equality."""
    lo, hi = wilson_interval(successes, n, confidence=confidence)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2, dtype=torch.float64))
    phat = successes / n
    for end in (lo, hi):
        if 0.0 < end < 1.0:
            assert abs(abs(phat - end) - float(z) * math.sqrt(end * (1 - end) / n)) < 1e-12
    assert 0.0 <= lo <= phat <= hi <= 1.0
    assert (lo == 0.0) == (successes == 0) and (hi == 1.0) == (successes == n)
    # Points just outside the interval fail the score test; just inside, pass.
    for p, inside in ((lo - 1e-6, False), (lo + 1e-6, True), (hi - 1e-6, True), (hi + 1e-6, False)):
        if 0.0 < p < 1.0:
            assert (abs(phat - p) <= float(z) * math.sqrt(p * (1 - p) / n)) == inside


def test_wilson_interval_errors():
    with pytest.raises(ValueError, match="positive count"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes must be in"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 4, confidence=1.0)


def test_bootstrap_means_resample_pairs_together():
    torch.manual_seed(0)
    values = torch.randn(3, 37, dtype=torch.float64)
    values[2] = 4.25  # a constant row: every resample's mean is that constant
    boot = bootstrap_means(values, n_bootstrap=64, seed=5)
    assert boot.shape == (64, 3)
    assert torch.equal(boot, bootstrap_means(values, n_bootstrap=64, seed=5))
    assert torch.allclose(boot[:, 2], torch.full((64,), 4.25, dtype=torch.float64))
    # Row 1 = 2 * row 0: the same resamples are applied to every row.
    values[1] = 2 * values[0]
    boot = bootstrap_means(values, n_bootstrap=64, seed=5)
    assert torch.allclose(boot[:, 1], 2 * boot[:, 0], rtol=1e-12, atol=1e-12)
    # Chunked drawing (tiny chunks) gives valid means too: each within the row's range.
    assert bool((boot[:, 0] >= values[0].min()).all() and (boot[:, 0] <= values[0].max()).all())
    (lo, hi), = percentile_interval(boot[:, :1])
    assert lo <= float(values[0].mean()) <= hi or lo <= float(boot[:, 0].median()) <= hi


def mm_oracle(wins: torch.Tensor, prior: float, iterations: int = 50000) -> torch.Tensor:
    """Hunter's MM iteration for Bradley-Terry, plain float64 loops: an independent fitting algorithm."""
    k = wins.shape[0]
    w = [[(float(wins[a, b]) + prior) if a != b else 0.0 for b in range(k)] for a in range(k)]
    p = [1.0] * k
    for _ in range(iterations):
        new = []
        for a in range(k):
            denom = sum((w[a][b] + w[b][a]) / (p[a] + p[b]) for b in range(k) if b != a)
            new.append(sum(w[a]) / denom)
        g = math.exp(sum(math.log(x) for x in new) / k)
        new = [x / g for x in new]
        change = max(abs(math.log(x / y)) for x, y in zip(new, p))
        p = new
        if change < 1e-13:
            break
    theta = torch.tensor([math.log(x) for x in p], dtype=torch.float64)
    return theta - theta.mean()


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (5, 2)])
def test_bradley_terry_matches_mm_oracle(k, seed):
    generator = torch.Generator().manual_seed(seed)
    wins = torch.randint(0, 40, (k, k), generator=generator).double() + 0.5 * torch.randint(0, 2, (k, k),
                                                                                          generator=generator)
    wins.fill_diagonal_(0)
    for prior in (0.5, 2.0):
        got = bradley_terry(wins, prior=prior)
        expected = mm_oracle(wins, prior)
        assert torch.allclose(got, expected, rtol=0, atol=1e-8), (got, expected)


def test_bradley_terry_recovers_known_strengths_and_order():
    true = torch.tensor([1.3, -0.4, 0.2, -2.0, 0.6], dtype=torch.float64)
    true = true - true.mean()
    p = torch.sigmoid(true[:, None] - true[None, :])
    # Expected win counts: the MLE (prior 0) is exactly the true strengths.
    got = bradley_terry(p * 300, prior=0.0)
    assert torch.allclose(got, true, rtol=0, atol=1e-9), (got, true)
    # Sampled comparisons: the order is recovered.
    generator = torch.Generator().manual_seed(0)
    games = 2000
    sampled = torch.zeros(5, 5, dtype=torch.float64)
    for a in range(5):
        for b in range(a + 1, 5):
            total = torch.tensor(float(games), dtype=torch.float64)
            won = int(torch.binomial(total, p[a, b], generator=generator))
            sampled[a, b], sampled[b, a] = won, games - won
    fitted = bradley_terry(sampled)
    assert torch.argsort(fitted, descending=True).tolist() == torch.argsort(true, descending=True).tolist()
    # Leading dimensions are independent problems.
    batch = torch.stack([sampled, p * 300, sampled.T.contiguous()])
    stacked = bradley_terry(batch)
    for i in range(3):
        assert torch.allclose(stacked[i], bradley_terry(batch[i]), rtol=0, atol=1e-10)


def test_bradley_terry_is_finite_when_a_model_wins_everything():
    wins = torch.tensor([[0, 30, 30], [0, 0, 12], [0, 18, 0]], dtype=torch.float64)
    theta = bradley_terry(wins)
    assert bool(torch.isfinite(theta).all())
    assert theta.argmax().item() == 0 and theta[2] > theta[1]
    assert torch.allclose(theta, mm_oracle(wins, 0.5), atol=1e-8)
    with pytest.raises(ValueError, match=r"\[\.\.\., k, k\]"):
        bradley_terry(torch.zeros(3, 2))


def test_rank_models_counts_each_distinct_model_once(tokenizer, models, monkeypatch):
    """k models sharing one reference: k + 1 pair_logps passes, not one per (model, reference) use."""
    model, ref = models
    third = tiny_llama(len(tokenizer), 4)
    calls = []
    real = evaluation.pair_logps

    def counting(m, *args, **kwargs):
        calls.append(id(m))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(evaluation, "pair_logps", counting)
    rows = [{"prompt": p, "chosen": r, "rejected": r + " no"} for p, r in TEXT_ROWS]
    entries = [("a", model, ref), ("b", third, ref), ("c", model, None), ("ref", ref, ref)]
    result = evaluation.rank_models(entries, tokenizer, rows, beta=BETA, n_bootstrap=20,
                                    max_length=MAX_LENGTH)
    assert sorted(calls) == sorted([id(model), id(ref), id(third)])
    assert result.forward_passes == 3
    assert result.names == ["a", "b", "c", "ref"]
    for values, intervals in ((result.reward_accuracy, result.reward_accuracy_ci),
                              (result.likelihood_accuracy, result.likelihood_accuracy_ci),
                              (result.strengths, result.strength_ci)):
        for value, (lo, hi) in zip(values, intervals):
            assert lo - 1e-12 <= value <= hi + 1e-12, (value, lo, hi)  # float64 round-off of separate fits
    # "c" is "a" without its reference: same policy log-probs, so the same likelihood accuracy.
    assert result.likelihood_accuracy[0] == result.likelihood_accuracy[2]
    # Accuracy intervals are Wilson's, as in `score`: "ref" against itself has accuracy 0 on every pair, and
    # its interval still reaches above 0 (a bootstrap of all-equal outcomes would be [0, 0]).
    n = result.num_pairs
    for values, intervals in ((result.reward_accuracy, result.reward_accuracy_ci),
                              (result.likelihood_accuracy, result.likelihood_accuracy_ci)):
        for value, interval in zip(values, intervals):
            assert interval == wilson_interval(round(value * n), n)
    assert result.reward_accuracy[3] == 0.0 and result.reward_accuracy_ci[3].high > 0.0
    assert "intervals: accuracies Wilson" in result.table()
    assert result.to_dict()["interval_method"]["accuracies"] == "Wilson score interval"


def test_rank_table_flags_complete_separation():
    result = evaluation.RankResult(
        names=["good", "bad"], reference_free=[False, False], num_pairs=40, beta=0.1, reward_accuracy=[1.0, 0.0],
        reward_accuracy_ci=[wilson_interval(40, 40), wilson_interval(0, 40)], likelihood_accuracy=[1.0, 0.0],
        likelihood_accuracy_ci=[wilson_interval(40, 40), wilson_interval(0, 40)], mean_margin=[1.0, -1.0],
        win_rate=torch.tensor([[0.5, 1.0], [0.0, 0.5]]), strengths=[2.2, -2.2],
        strength_ci=[evaluation.Interval(2.2, 2.2), evaluation.Interval(-2.2, -2.2)],
        order=[0, 1], confidence=0.95, n_bootstrap=10, seed=0, prior=0.5, forward_passes=2)
    assert result.separated_pairs() == [("good", "bad")]
    assert "complete separation (good > bad: every pair)" in result.table()
    # The Bradley-Terry gap under separation is the prior's: log((n + 0.5) / 0.5) for n pairs.
    theta = bradley_terry(torch.tensor([[0.0, 40.0], [0.0, 0.0]], dtype=torch.float64))
    assert float(theta[0] - theta[1]) == pytest.approx(math.log(81))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_implicit_rewards_on_cuda_match_float64_oracle(tokenizer, models):
    """The CUDA path (Triton log-prob kernels) against the CPU float64 oracle, sequence and per-token."""
    model, ref = models
    prompts, responses = [r[0] for r in TEXT_ROWS], [r[1] for r in TEXT_ROWS]
    cuda_model, cuda_ref = copy.deepcopy(model).cuda(), copy.deepcopy(ref).cuda()
    options = dict(beta=BETA, max_length=MAX_LENGTH)
    got = implicit_rewards(cuda_model, cuda_ref, tokenizer, prompts, responses, **options)
    per_token = implicit_rewards(cuda_model, cuda_ref, tokenizer, prompts, responses, per_token=True,
                                 **options)
    expected, scale = [], 0.0
    for i, (prompt_ids, response_ids) in enumerate(expected_ids(tokenizer, TEXT_ROWS)):
        policy = oracle_token_logps(model, prompt_ids, response_ids)
        reference = oracle_token_logps(ref, prompt_ids, response_ids)
        expected.append(float(BETA * (policy - reference).sum()))
        scale = max(scale, float(policy.sum().abs()), float(reference.sum().abs()))
        assert_rewards_close(per_token[i], BETA * (policy - reference), math.log(len(tokenizer)) * 4,
                             f"cuda row {i} per-token rewards")
    assert got.device.type == "cpu"
    assert_rewards_close(got, torch.tensor(expected, dtype=torch.float64), scale, "cuda sequence rewards")
