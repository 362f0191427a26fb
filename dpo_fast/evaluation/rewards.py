"""Implicit DPO rewards, scoring a preference set with them, and ranking models on preference pairs.

A DPO policy pi trained against a reference pi_ref defines an implicit reward

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))

(reference-free: r(x, y) = beta * log pi(y | x)). On a preference pair (x, y_w, y_l) its margin
r(x, y_w) - r(x, y_l) says how strongly the policy prefers the chosen response; "reward accuracy" is the
fraction of pairs with a margin > 0 (strictly: a policy equal to its reference has margin 0 everywhere,
accuracy 0). "Likelihood accuracy" asks the same of the plain log-probs, log pi(y_w | x) > log pi(y_l | x).

Every log-prob comes from `dpo_fast.training.scoring.pair_logps` (batched, prefix-shared layout, fused lm_head),
once per model: ranking k models costs k passes over the data (plus one per distinct reference model),
while the head-to-head part compares the k * (k - 1) / 2 model pairs from those stored numbers.

Statistics:
- score_pairs: the reward accuracy's interval is Wilson's score interval; the mean margin's is a
  percentile bootstrap over pairs.
- rank_models: the accuracies' intervals are Wilson's too (the same as `score`'s, and honest at 0% and
  100%, where a bootstrap of all-equal outcomes has zero width); the Bradley-Terry strengths' are a
  percentile bootstrap over pairs, one set of resamples shared by all models (a paired bootstrap: the
  models are compared on the same resampled pairs).
- Bradley-Terry: P(a beats b) = sigmoid(theta_a - theta_b), fitted by Newton's method (logistic likelihood)
  to the per-pair head-to-head results, with one virtual tie between every two models (`prior=0.5` win each
  way) so that a model that wins or loses every comparison keeps a finite strength.
  Under complete separation (a model beats another on every pair) the maximum-likelihood difference is
  infinite: the fitted one is set by the prior (about log(2n + 1) for n pairs between two models), and
  every resample is separated too, so its bootstrap interval is narrow or a point. Read such a strength
  and interval as "at least this much stronger", not as a measured size; the table says when it happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..data.layouts import check_layout
from ..data.pairs import TokenizedPair
from ..training.scoring import output_head, pair_logps, scored_batches

logger = logging.getLogger(__name__)

# Stand-in second responses for `implicit_rewards` rows whose prompt has no partner response: the
# tokenizer drops a pair whose two responses tokenize identically, so a second stand-in covers the row
# whose response is the first one.
_FILLERS = ("0", "1")
# Bootstrap resamples are drawn as a [chunk, pairs] count matrix; this caps its size (float64 entries).
_BOOTSTRAP_CELLS = 1 << 22


class Interval(NamedTuple):
    """A two-sided confidence interval."""

    low: float
    high: float


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return float(beta)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def vocabulary_of(model) -> tuple[int | None, int]:
    """(config.vocab_size, rows of the output head) of a transformers causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "vocab_size", None), int(output_head(model).weight.shape[0])


def check_same_vocabulary(named_models: Sequence[tuple[str, Any]],
                          pairs: Sequence[TokenizedPair] = ()) -> None:
    """Raises ValueError unless every model has the same vocabulary (config.vocab_size and lm_head rows)
    and every token id of `pairs` is inside it. A model compared with a reference of another tokenizer
    would be scored on ids that mean different things to the two models."""
    if not named_models:
        return
    first_name, first = named_models[0]
    first_vocab = vocabulary_of(first)
    for name, model in named_models[1:]:
        vocab = vocabulary_of(model)
        if vocab != first_vocab:
            raise ValueError(
                f"{first_name!r} and {name!r} do not share a vocabulary: {first_name!r} has "
                f"config.vocab_size={first_vocab[0]} and an lm_head of {first_vocab[1]} rows, {name!r} has "
                f"config.vocab_size="
                f"{vocab[0]} and {vocab[1]} rows; models compared (and a policy and its reference) must use "
                "the same tokenizer"
            )
    if pairs:
        largest = max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in pairs)
        if largest >= first_vocab[1]:
            raise ValueError(
                f"the tokenizer produced token id {largest}, outside the vocabulary of {first_name!r} "
                f"({first_vocab[1]} lm_head rows): the tokenizer does not belong to the model"
            )


def _named(model, ref_model, model_name: str = "model", ref_name: str = "ref_model") -> list[tuple[str, Any]]:
    return [(model_name, model)] + ([] if ref_model is None else [(ref_name, ref_model)])


# ---------------------------------------------------------------------------------------------------------
# Implicit rewards of (prompt, response) rows
# ---------------------------------------------------------------------------------------------------------


def _tokenize_responses(tokenizer, prompts: Sequence[Any], responses: Sequence[Any],
                        max_length: int) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(prompt ids, response ids, filler ids) per row, with `tokenize_pair`'s rules (chat template, EOS,
    truncation) for the response as the chosen side of a pair whose other side is a one-character filler.

    The filler (one character, then EOS) is no longer than any non-empty response for tokenizers that
    encode one character as one token, so it does not change how the row is truncated.
    """
    from ..data.tokenization import tokenize_dataset, tokenize_pair

    rows = [{"prompt": p, "chosen": r, "rejected": _FILLERS[0]} for p, r in zip(prompts, responses)]
    kept, _ = tokenize_dataset(tokenizer, rows, max_length=max_length)
    by_row: dict[int, TokenizedPair] = {p.index: p for p in kept}
    out = []
    for i, row in enumerate(rows):
        pair = by_row.get(i)
        if pair is None:
            pair = tokenize_pair(tokenizer, {**row, "rejected": _FILLERS[1]}, max_length=max_length, index=i)
        if pair is None:
            raise ValueError(f"responses[{i}] cannot be scored: it is empty, or prompts[{i}] leaves it no "
                             f"room within max_length={max_length}")
        out.append((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))
    return out


def _response_pairs(tokenized) -> tuple[list[TokenizedPair], list[tuple[int, int]]]:
    """Two responses with the same prompt ids share one pair (the prompt is computed once); a response
    left alone gets its filler as the second response. Returns the pairs and, per response, (pair, side)."""
    pairs: list[list] = []
    slots: list[tuple[int, int]] = []
    waiting: dict[tuple[int, ...], int] = {}  # prompt ids -> pair that has one response so far
    for prompt_ids, ids, filler in tokenized:
        k = waiting.pop(prompt_ids, None)
        if k is None:
            waiting[prompt_ids] = len(pairs)
            slots.append((len(pairs), 0))
            pairs.append([prompt_ids, ids, filler])
        else:
            pairs[k][2] = ids
            slots.append((k, 1))
    return [TokenizedPair(p, c, r, index=k) for k, (p, c, r) in enumerate(pairs)], slots


@torch.no_grad()
def pair_token_logps(model, tokenizer, pairs: Sequence[TokenizedPair], *, layout: str = "prefix_shared",
                     max_length: int = 1024, max_tokens_per_batch: int | None = None,
                     backend: str = "auto") -> tuple[list[Tensor], list[Tensor]]:
    """Per-token log-probs of each pair's chosen and rejected ids: `pair_logps` without the final sum.

    Same batching, layout and fused head as `dpo_fast.training.scoring.pair_logps` (whose sums these tokens add up
    to); kept apart because the sums need no per-token bookkeeping.
    Returns two lists of float32 CPU tensors, [len(chosen_ids)] and [len(rejected_ids)] per pair.
    """
    check_layout(layout)
    if not pairs:
        return [], []
    for i, p in enumerate(pairs):
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
        if longest > max_length:
            raise ValueError(f"pairs[{i}] has a sequence of {longest} tokens, more than "
                             f"max_length={max_length}")
    chosen: list[Tensor] = [torch.zeros(0)] * len(pairs)
    rejected: list[Tensor] = [torch.zeros(0)] * len(pairs)
    for scored in scored_batches(model, tokenizer, pairs, layout=layout, max_length=max_length,
                                 max_tokens_per_batch=max_tokens_per_batch, backend=backend):
        tok = scored.token_logps.cpu()
        seg = scored.segment_ids.cpu()
        # Every layout lays a sequence's tokens out left to right, so a stable sort by segment keeps each
        # sequence's tokens in order.
        order = torch.sort(seg, stable=True).indices
        b = len(scored.members)
        pieces = torch.split(tok[order], torch.bincount(seg, minlength=2 * b).tolist())
        for j, i in enumerate(scored.members):
            chosen[i], rejected[i] = pieces[j].clone(), pieces[b + j].clone()
    return chosen, rejected


def implicit_rewards(model, ref_model, tokenizer, prompts: Sequence[Any], responses: Sequence[Any], *,
                     beta: float, per_token: bool = False, max_length: int = 1024,
                     layout: str = "prefix_shared", max_tokens_per_batch: int | None = None
                     ) -> Tensor | list[Tensor]:
    """DPO implicit rewards beta * (log pi(y|x) - log pi_ref(y|x)) of each response given its prompt.

    Args:
        model, ref_model: transformers causal LMs sharing `tokenizer`'s vocabulary; ref_model=None is
            reference-free (the reward is beta * log pi(y|x)). Scored as they are (call `.eval()`).
        prompts, responses: n rows; a prompt is a string or a message list (chat template applied), a
            response a string (an assistant turn for a chat prompt) or a message list. Tokenized like the
            chosen side of `dpo_fast.data.tokenization.tokenize_pair` (EOS appended, truncation to max_length).
        per_token: also split each reward over the response tokens (EOS included).
    Returns:
        [n] float32 sequence rewards, or with per_token=True a list of n float32 tensors
        [response tokens], beta times each token's log-ratio (they sum to the sequence reward).
    """
    beta = _check_beta(beta)
    for name, value in (("prompts", prompts), ("responses", responses)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a sequence of rows, got a single string; wrap it in a list")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; expected one prompt "
                         "per response")
    if len(prompts) == 0:
        raise ValueError("prompts and responses are empty: there is nothing to score")
    pairs, slots = _response_pairs(_tokenize_responses(tokenizer, prompts, responses, max_length))
    check_same_vocabulary(_named(model, ref_model), pairs)
    options = dict(layout=layout, max_length=max_length, max_tokens_per_batch=max_tokens_per_batch)
    if per_token:
        sides = [pair_token_logps(model, tokenizer, pairs, **options)]
        if ref_model is not None:
            sides.append(pair_token_logps(ref_model, tokenizer, pairs, **options))

        def reward(k: int, side: int) -> Tensor:
            policy = sides[0][side][k].double()
            ref = sides[1][side][k].double() if len(sides) > 1 else 0.0
            return (beta * (policy - ref)).float()

        return [reward(k, side) for k, side in slots]
    logps = [torch.stack(pair_logps(model, tokenizer, pairs, **options)).double()]
    if ref_model is not None:
        logps.append(torch.stack(pair_logps(ref_model, tokenizer, pairs, **options)).double())
    ratio = logps[0] - logps[1] if len(logps) > 1 else logps[0]
    k = torch.tensor([k for k, _ in slots])
    side = torch.tensor([s for _, s in slots])
    return (beta * ratio[side, k]).float()


# ---------------------------------------------------------------------------------------------------------
# Preference data -> tokenized pairs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedPairs:
    """Tokenized pairs ready to score. rows: dataset rows read; pairs[i].index is pair i's dataset row;
    dropped: rows that could not become a pair (reasons in `summary`)."""

    pairs: list[TokenizedPair]
    rows: int
    dropped: int
    summary: str


def prepare_pairs(tokenizer, data: Any, *, max_length: int = 1024) -> PreparedPairs:
    """`data` (a path, a `load_preferences` Dataset, raw {prompt, chosen, rejected} rows, or TokenizedPair
    rows) -> tokenized pairs. Rows the tokenizer drops are counted and skipped; none left raises."""
    from ..data.tokenization import tokenize_dataset

    if isinstance(data, (str, os.PathLike)):
        from ..data.formats import load_preferences

        data = load_preferences(os.fspath(data))
    rows = list(data)
    if not rows:
        raise ValueError("the preference data is empty: no pair to score")
    if all(isinstance(r, TokenizedPair) for r in rows):
        pairs = [p if p.index >= 0 else TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, index=i)
                 for i, p in enumerate(rows)]
        return PreparedPairs(pairs, len(rows), 0, f"{len(rows)} tokenized pairs")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise TypeError(f"data[{bad}] must be a {{prompt, chosen, rejected}} row or a TokenizedPair, "
                        f"got {type(rows[bad]).__name__}")
    pairs, stats = tokenize_dataset(tokenizer, rows, max_length=max_length)
    if not pairs:
        raise ValueError(f"no row of the preference data could be tokenized into a pair: {stats.summary()}")
    return PreparedPairs(pairs, stats.rows, stats.num_dropped, stats.summary())


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a binomial proportion: the p with |successes/n - p| <= z sqrt(p(1-p)/n)."""
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n must be a positive count, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n successes an end is exactly 0 or 1; the formula leaves round-off there.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return Interval(low, high)


def bootstrap_means(values: Tensor, *, n_bootstrap: int, seed: int) -> Tensor:
    """[m, n] per-pair values -> [n_bootstrap, m] means over resamples (with replacement) of the n pairs.

    The resamples depend only on (n, n_bootstrap, seed): rows of `values` are resampled together.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    values = values.double()
    n = values.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    out = []
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        drawn = torch.randint(n, (size, n), generator=generator)
        counts = torch.zeros(size, n, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(size, n,
                                                                                             dtype=torch.float64))
        out.append(counts @ values.T / n)
    return torch.cat(out)


def percentile_interval(samples: Tensor, *, confidence: float = 0.95) -> list[Interval]:
    """[B, m] bootstrap samples -> m percentile intervals."""
    _check_confidence(confidence)
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    bounds = torch.quantile(samples.double(), q, dim=0)
    return [Interval(float(lo), float(hi)) for lo, hi in zip(bounds[0], bounds[1])]


def win_indicators(margins: Tensor) -> Tensor:
    """[k, n] per-model margins -> [k, k, n]: 1 where model a's margin beats model b's on pair i, 1/2 on a
    tie, 0 otherwise."""
    a, b = margins[:, None, :], margins[None, :, :]
    return (a > b).double() + 0.5 * (a == b).double()


def bradley_terry(wins: Tensor, *, prior: float = 0.5, max_iter: int = 100, tol: float = 1e-10) -> Tensor:
    """Bradley-Terry log-strengths from head-to-head results: Newton's method on the likelihood (float64).

    Args:
        wins: [..., k, k]; wins[a, b] = comparisons model a won against model b (ties split in halves);
            the diagonal is ignored. Leading dimensions are independent problems (bootstrap resamples).
        prior: virtual wins added each way between every two models (one virtual tie at 0.5). It keeps
            the strengths finite when a model wins or loses every comparison; 0 gives the plain maximum
            likelihood estimate (finite only when every model has both wins and losses in a connected
            comparison graph).
    Returns:
        [..., k] theta maximising sum_ab wins[a, b] * log sigmoid(theta_a - theta_b), centred to mean 0.
    """
    if wins.dim() < 2 or wins.shape[-1] != wins.shape[-2]:
        raise ValueError(f"wins must have shape [..., k, k], got {list(wins.shape)}")
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    k = wins.shape[-1]
    off = 1.0 - torch.eye(k, dtype=torch.float64)
    w = (wins.double() + prior) * off
    if bool((w < 0).any()):
        raise ValueError("wins must be non-negative counts")
    games = w + w.transpose(-1, -2)
    # The likelihood only sees differences: adding J = ones(k, k) to the negated Hessian pins the mean
    # (the step stays orthogonal to ones since the gradient is) and makes the system positive definite.
    ones = torch.ones(k, k, dtype=torch.float64)

    def log_likelihood(theta: Tensor) -> Tensor:
        diff = theta[..., :, None] - theta[..., None, :]
        return (w * torch.nn.functional.logsigmoid(diff)).sum((-1, -2))

    theta = torch.zeros(wins.shape[:-1], dtype=torch.float64)
    current = log_likelihood(theta)
    # Stop at a gradient this small against the number of games: float64 round-off of the likelihood.
    threshold = tol * games.sum((-1, -2)).clamp(min=1.0)
    for _ in range(max_iter):
        p = torch.sigmoid(theta[..., :, None] - theta[..., None, :])
        grad = (w - games * p).sum(-1)
        if bool((grad.abs().amax(-1) <= threshold).all()):
            break
        curvature = games * p * (1 - p)
        neg_hessian = torch.diag_embed(curvature.sum(-1)) - curvature
        # A model that never loses (or never wins) with prior=0 has no finite optimum and a vanishing
        # curvature: lstsq keeps the step finite where solve would fail on the singular system.
        step = torch.linalg.lstsq(neg_hessian + ones, grad.unsqueeze(-1)).solution.squeeze(-1)
        # Backtracking per problem: a full Newton step can overshoot far from the optimum; a decrease
        # within round-off is accepted, else a converged problem would halve its step forever.
        slack = 1e-12 * current.abs().clamp(min=1.0)
        scale = torch.ones(theta.shape[:-1], dtype=torch.float64)
        for _ in range(30):
            worse = log_likelihood(theta + scale[..., None] * step) < current - slack
            if not bool(worse.any()):
                break
            scale = torch.where(worse, scale / 2, scale)
        theta = theta + scale[..., None] * step
        current = log_likelihood(theta)
    return theta - theta.mean(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# Scoring one model on a preference set
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """Per-pair implicit rewards of one model on a preference set, and their summary.

    index: each scored pair's dataset row. correct: chosen reward strictly above the rejected one.
    accuracy_ci: Wilson score interval; margin_ci: percentile bootstrap over pairs (both at `confidence`).
    """

    index: list[int]
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    correct: Tensor
    beta: float
    reference_free: bool
    accuracy: float
    accuracy_ci: Interval
    mean_margin: float
    margin_ci: Interval
    confidence: float
    rows: int
    dropped: int

    @property
    def num_pairs(self) -> int:
        return len(self.index)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready row per pair: index, chosen_reward, rejected_reward, margin, correct."""
        columns = zip(self.index, self.chosen_rewards.tolist(), self.rejected_rewards.tolist(),
                      self.margins.tolist(), self.correct.tolist())
        return [{"index": i, "chosen_reward": c, "rejected_reward": r, "margin": m, "correct": bool(ok)}
                for i, c, r, m, ok in columns]

    def summary(self) -> str:
        pct = f"{self.confidence:.0%}"
        kind = "reference-free " if self.reference_free else ""
        dropped = f" ({self.dropped} of {self.rows} rows dropped by tokenization)" if self.dropped else ""
        return (f"{self.num_pairs} pairs{dropped}, beta={self.beta:g}, {kind}implicit rewards\n"
                f"reward accuracy {self.accuracy:.4f}  "
                f"[{self.accuracy_ci.low:.4f}, {self.accuracy_ci.high:.4f}] ({pct} Wilson)\n"
                f"mean margin     {self.mean_margin:+.4f}  "
                f"[{self.margin_ci.low:+.4f}, {self.margin_ci.high:+.4f}] "
                f"({pct} percentile bootstrap over pairs)")


def score_pairs(model, ref_model, tokenizer, data: Any, *, beta: float, max_length: int = 1024,
                layout: str = "prefix_shared", max_tokens_per_batch: int | None = None,
                confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0) -> ScoreResult:
    """Implicit rewards of the chosen and rejected response of every pair of `data` (see `prepare_pairs`
    for its forms); ref_model=None is reference-free. One `pair_logps` pass per model."""
    beta = _check_beta(beta)
    _check_confidence(confidence)
    prepared = prepare_pairs(tokenizer, data, max_length=max_length)
    check_same_vocabulary(_named(model, ref_model), prepared.pairs)
    options = dict(layout=layout, max_length=max_length, max_tokens_per_batch=max_tokens_per_batch)
    logps = torch.stack(pair_logps(model, tokenizer, prepared.pairs, **options)).double()
    if ref_model is not None:
        logps = logps - torch.stack(pair_logps(ref_model, tokenizer, prepared.pairs, **options)).double()
    rewards = beta * logps
    margins = rewards[0] - rewards[1]
    correct = margins > 0
    n = margins.numel()
    boot = bootstrap_means(margins[None], n_bootstrap=n_bootstrap, seed=seed)
    return ScoreResult(
        index=[p.index for p in prepared.pairs],
        chosen_rewards=rewards[0].float(),
        rejected_rewards=rewards[1].float(),
        margins=margins.float(),
        correct=correct,
        beta=beta,
        reference_free=ref_model is None,
        accuracy=float(correct.double().mean()),
        accuracy_ci=wilson_interval(int(correct.sum()), n, confidence=confidence),
        mean_margin=float(margins.mean()),
        margin_ci=percentile_interval(boot, confidence=confidence)[0],
        confidence=confidence,
        rows=prepared.rows,
        dropped=prepared.dropped,
    )


# ---------------------------------------------------------------------------------------------------------
# Ranking several models
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankResult:
    """Models compared on the same preference pairs; lists are in input order, `order` is best first.

    win_rate[a, b]: fraction of pairs where model a's reward margin beats model b's (ties count 1/2).
    strengths: Bradley-Terry log-strengths fitted to those head-to-head results (mean 0).
    Intervals: accuracies, Wilson score intervals; strengths, percentile bootstrap over pairs with
    `n_bootstrap` resamples shared by every model (see the module doc on complete separation).
    """

    names: list[str]
    reference_free: list[bool]
    num_pairs: int
    beta: float
    reward_accuracy: list[float]
    reward_accuracy_ci: list[Interval]
    likelihood_accuracy: list[float]
    likelihood_accuracy_ci: list[Interval]
    mean_margin: list[float]
    win_rate: Tensor
    strengths: list[float]
    strength_ci: list[Interval]
    order: list[int]
    confidence: float
    n_bootstrap: int
    seed: int
    prior: float
    forward_passes: int

    def to_dict(self) -> dict[str, Any]:
        models = []
        for rank, i in enumerate(self.order, start=1):
            models.append({
                "rank": rank, "name": self.names[i], "reference_free": self.reference_free[i],
                "reward_accuracy": self.reward_accuracy[i],
                "reward_accuracy_ci": list(self.reward_accuracy_ci[i]),
                "likelihood_accuracy": self.likelihood_accuracy[i],
                "likelihood_accuracy_ci": list(self.likelihood_accuracy_ci[i]),
                "mean_margin": self.mean_margin[i],
                "bradley_terry_strength": self.strengths[i],
                "bradley_terry_strength_ci": list(self.strength_ci[i]),
            })
        return {
            "num_pairs": self.num_pairs, "beta": self.beta, "confidence": self.confidence,
            "interval_method": {
                "accuracies": "Wilson score interval",
                "bradley_terry_strength": f"percentile bootstrap over pairs, {self.n_bootstrap} resamples "
                                          f"(seed {self.seed}), shared by all models",
            },
            "separated": [list(p) for p in self.separated_pairs()],
            "bradley_terry": f"Newton fit of P(a beats b) = sigmoid(theta_a - theta_b) to per-pair "
                             f"head-to-head results, {self.prior:g} virtual wins each way per model pair, "
                             "mean theta = 0",
            "forward_passes": self.forward_passes,
            "models": models,
            "win_rate": {"names": list(self.names), "matrix": self.win_rate.tolist(),
                         "definition": "row model's reward margin larger than column model's, "
                                       "ties count 1/2"},
        }

    def separated_pairs(self) -> list[tuple[str, str]]:
        """(winner, loser) for every two models where one's margin is larger on every pair."""
        k = len(self.names)
        return [(self.names[a], self.names[b]) for a in range(k) for b in range(k)
                if a != b and float(self.win_rate[a, b]) == 1.0]

    def table(self) -> str:
        pct = f"{self.confidence:.0%}"
        header = ["rank", "model", f"reward acc [{pct} CI]", f"likelihood acc [{pct} CI]", "mean margin",
                  f"BT strength [{pct} CI]"]
        rows = [header]
        for rank, i in enumerate(self.order, start=1):
            ra, la, s = self.reward_accuracy_ci[i], self.likelihood_accuracy_ci[i], self.strength_ci[i]
            rows.append([str(rank), self.names[i],
                         f"{self.reward_accuracy[i]:.3f} [{ra.low:.3f}, {ra.high:.3f}]",
                         f"{self.likelihood_accuracy[i]:.3f} [{la.low:.3f}, {la.high:.3f}]",
                         f"{self.mean_margin[i]:+.4f}",
                         f"{_signed(self.strengths[i])} [{_signed(s.low)}, {_signed(s.high)}]"])
        lines = _columns(rows, right={0, 4})
        k = len(self.names)
        grid = [[""] + list(self.names)]
        for a in range(k):
            grid.append([self.names[a]] + [f"{float(self.win_rate[a, b]):.3f}" if a != b else "-"
                                           for b in range(k)])
        lines += ["", f"win rate (row beats column on a pair; {self.num_pairs} pairs):"]
        lines += _columns(grid, right=set(range(1, k + 1)))
        lines += ["", f"intervals: accuracies Wilson; BT strengths percentile bootstrap over pairs "
                      f"({self.n_bootstrap} resamples)"]
        separated = self.separated_pairs()
        if separated:
            named = ", ".join(f"{a} > {b}" for a, b in separated)
            lines.append(f"complete separation ({named}: every pair): those BT strength gaps are set by the "
                         f"prior ({self.prior:g} virtual wins each way) and their intervals are narrow by "
                         "construction; read them as lower bounds")
        return "\n".join(lines)


def _signed(value: float) -> str:
    # Round-off around a strength of 0 would print as -0.000.
    return f"{value + 0.0:+.3f}" if abs(value) >= 5e-4 else "+0.000"


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def rank_models(models: Sequence[tuple[str, Any, Any]], tokenizer, data: Any, *, beta: float,
                n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95, prior: float = 0.5,
                max_length: int = 1024, layout: str = "prefix_shared",
                max_tokens_per_batch: int | None = None) -> RankResult:
    """Rank models by their implicit rewards on the same preference pairs.

    models: (name, model, ref_model or None) triples; None is reference-free. Every distinct model object
    (policies and references, by identity) is scored once with `pair_logps`: k models sharing one
    reference cost k + 1 passes over the data. The head-to-head comparisons (k^2 cells) reuse those numbers.
    """
    beta = _check_beta(beta)
    _check_confidence(confidence)
    if not models:
        raise ValueError("models is empty: give at least one (name, model, ref_model) triple")
    names = [m[0] for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names must be distinct, got {duplicates} more than once")
    prepared = prepare_pairs(tokenizer, data, max_length=max_length)
    named: list[tuple[str, Any]] = []
    for name, model, ref in models:
        named.append((name, model))
        if ref is not None:
            named.append((f"reference of {name}", ref))
    check_same_vocabulary(named, prepared.pairs)

    options = dict(layout=layout, max_length=max_length, max_tokens_per_batch=max_tokens_per_batch)
    cache: dict[int, Tensor] = {}
    keep_alive = []  # ids are only unique while the objects live

    def logps_of(model) -> Tensor:
        if id(model) not in cache:
            keep_alive.append(model)
            cache[id(model)] = torch.stack(pair_logps(model, tokenizer, prepared.pairs, **options)).double()
        return cache[id(model)]

    margins, likelihood_correct = [], []
    for _, model, ref in models:
        policy = logps_of(model)
        ratio = policy - logps_of(ref) if ref is not None else policy
        margins.append(beta * (ratio[0] - ratio[1]))
        likelihood_correct.append((policy[0] > policy[1]).double())
    margins_t = torch.stack(margins)  # [k, n]
    k, n = margins_t.shape
    reward_correct = (margins_t > 0).double()
    wins = win_indicators(margins_t)  # [k, k, n]

    # Point estimates of every per-pair quantity at once:
    # rows [reward correct | likelihood correct | margin | wins], k, k, k and k * k of them.
    per_pair = torch.cat([reward_correct, torch.stack(likelihood_correct), margins_t, wins.reshape(k * k, n)])
    point = per_pair.mean(-1)
    # Only the head-to-head results are resampled: the accuracies' intervals are Wilson's.
    boot = bootstrap_means(wins.reshape(k * k, n), n_bootstrap=n_bootstrap, seed=seed)
    win_rate = point[3 * k:].reshape(k, k)
    strengths = bradley_terry(win_rate * n, prior=prior)
    boot_strengths = bradley_terry(boot.reshape(-1, k, k) * n, prior=prior)
    reward_ci = [wilson_interval(int(c.sum()), n, confidence=confidence) for c in reward_correct]
    likelihood_ci = [wilson_interval(int(c.sum()), n, confidence=confidence) for c in likelihood_correct]
    strength_ci = percentile_interval(boot_strengths, confidence=confidence)
    order = sorted(range(k), key=lambda i: (-float(strengths[i]), -float(point[i]), i))
    return RankResult(
        names=names, reference_free=[ref is None for _, _, ref in models], num_pairs=n, beta=beta,
        reward_accuracy=point[:k].tolist(), reward_accuracy_ci=reward_ci,
        likelihood_accuracy=point[k:2 * k].tolist(), likelihood_accuracy_ci=likelihood_ci,
        mean_margin=point[2 * k:3 * k].tolist(), win_rate=win_rate.float(), strengths=strengths.tolist(),
        strength_ci=strength_ci, order=order, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed,
        prior=prior, forward_passes=len(cache),
    )


# ---------------------------------------------------------------------------------------------------------
# Outputs (atomic writes)
# ---------------------------------------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    from ..training.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, data)


def write_scores(result: ScoreResult, path: str) -> str:
    """One JSON line per pair (`ScoreResult.records`), written atomically."""
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in result.records()).encode("utf-8"))
    return path


def rank_chart_png(result: RankResult) -> bytes:
    """Accuracies with their interval error bars, and the win-rate heatmap, as PNG bytes (matplotlib Agg)."""
    import io

    from matplotlib.figure import Figure

    k = len(result.names)
    fig = Figure(figsize=(6 + 0.9 * k, 4.2), constrained_layout=True)
    ax_acc, ax_win = fig.subplots(1, 2)
    xs = list(range(k))
    for offset, label, values, cis in (
        (-0.2, "reward accuracy", result.reward_accuracy, result.reward_accuracy_ci),
        (0.2, "likelihood accuracy", result.likelihood_accuracy, result.likelihood_accuracy_ci),
    ):
        lower = [max(0.0, v - ci.low) for v, ci in zip(values, cis)]
        upper = [max(0.0, ci.high - v) for v, ci in zip(values, cis)]
        ax_acc.bar([x + offset for x in xs], values, width=0.4, label=label, yerr=[lower, upper], capsize=3)
    ax_acc.set_xticks(xs, result.names, rotation=20, ha="right")
    ax_acc.set_ylim(0, 1.05)
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_acc.set_title(f"accuracy on {result.num_pairs} pairs ({result.confidence:.0%} Wilson CI)")
    ax_acc.legend(loc="best", fontsize=8)
    matrix = result.win_rate.double().clone()
    matrix.fill_diagonal_(float("nan"))
    image = ax_win.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="RdBu")
    for a in range(k):
        for b in range(k):
            if a != b:
                ax_win.text(b, a, f"{float(matrix[a, b]):.2f}", ha="center", va="center", fontsize=8)
    ax_win.set_xticks(xs, result.names, rotation=20, ha="right")
    ax_win.set_yticks(xs, result.names)
    ax_win.set_title("win rate: row beats column")
    fig.colorbar(image, ax=ax_win, shrink=0.8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_rank_outputs(result: RankResult, output_dir: str) -> dict[str, str]:
    """rank.json and rank.png in `output_dir`, each written atomically (the chart is rendered first, so a
    plotting failure leaves no new file)."""
    png = rank_chart_png(result)
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    paths = {"json": os.path.join(output_dir, "rank.json"), "png": os.path.join(output_dir, "rank.png")}
    _atomic_write(paths["png"], png)
    _atomic_write(paths["json"], text.encode("utf-8"))
    return paths
