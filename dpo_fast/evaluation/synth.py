"""Synthetic preference pairs: sample responses from a model, score them, pair them, write a dataset.

For each prompt, `n` responses are sampled (`model.generate`, left-padded batches), duplicates and empty
responses are removed, a scorer gives every remaining response a number, and a pairing rule turns the
scored responses into (chosen, rejected) pairs with chosen scoring strictly higher. The result is a JSON
lines file of {prompt, chosen, rejected, score_chosen, score_rejected} rows that
`dpo_fast.data.load_preferences` reads (explicit format; the score columns are ignored there).

Scorers (`make_scorer` specs):

=====================  =================================================================================
"module:function"      any Python callable, called as f(prompt, response) -> number; a bool counts as 1/0
                       (e.g. "dpo_fast.demo.tasks:verify", which checks the sorting task's answers).
"length"               the response's length in characters (longer is preferred).
"confidence"           mean token log-prob of the response under the sampling model (EOS included when
                       it was generated).
"reward-model:PATH"    a transformers `AutoModelForSequenceClassification` on prompt + response: the
                       logit of the last label (the single logit of a one-label reward model).
"implicit:POLICY,REF"  the DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of a trained policy
                       and its reference (two causal LM directories), response scored with its EOS.
=====================  =================================================================================

Pairings: "best_vs_worst" (one pair: the highest against the lowest score), "best_vs_random" (one pair:
the highest against a seeded random response scoring strictly lower), "all_pairs_above_margin" (every
pair whose scores differ by more than `margin`). A prompt whose responses all score the same is a tie and
gives no pair; `SynthReport` counts ties and prompts left without a usable pair.

Nothing is written unless every response was scored: a scorer that raises or returns something that is
not a finite number stops the run with a `ScorerError` naming the scorer, the prompt index and the value.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import random
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PAIRINGS = ("best_vs_worst", "best_vs_random", "all_pairs_above_margin")
BUILTIN_SCORERS = ("length", "confidence")
# Responses per forward when a scorer runs a model (reward model, implicit reward, confidence).
SCORING_BATCH = 32


class ScorerError(ValueError):
    """A scorer failed or returned something that is not a number; names the scorer, prompt and value."""


# ---------------------------------------------------------------------------------------------------------
# Text <-> token ids
# ---------------------------------------------------------------------------------------------------------


class TextCodec:
    """Prompt and completion token ids, following `dpo_fast.data.tokenization.tokenize_pair`'s conventions.

    Text prompts get what the tokenizer's post-processor puts in front (e.g. BOS); message-list prompts are
    rendered with the chat template (generation prompt added). A completion's ids are those of
    prompt + completion after the prompt's, or of the completion alone when a merge crosses the boundary,
    followed by EOS: the ids a DPO run on the written file will score.
    """

    def __init__(self, tokenizer: Any):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: sampled responses need one to end")
        self.tokenizer = tokenizer
        self.eos_token_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        bare = self._encode("a")
        full = list(tokenizer.encode("a", add_special_tokens=True))
        self._text_prefix = full[: len(full) - len(bare)] if full[len(full) - len(bare):] == bare else []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _prompt_text(self, prompt: str | list) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: str | list) -> list[int]:
        ids = self._encode(self._prompt_text(prompt))
        return ids if not isinstance(prompt, str) else self._text_prefix + ids

    def encode_completion(self, prompt: str | list, completion: str) -> list[int]:
        text = self._prompt_text(prompt)
        core = self._encode(text)
        full = self._encode(text + completion)
        ids = full[len(core):] if full[: len(core)] == core and len(full) > len(core) else self._encode(completion)
        return ids if ids and ids[-1] == self.eos_token_id else ids + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or not sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def generate_completions(model, prompt_ids: Sequence[Sequence[int]], *, eos_token_id: int, pad_token_id: int,
                         n: int = 1, do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                         max_new_tokens: int = 64, batch_size: int = 16, seed: int | None = 0,
                         progress: bool = False, desc: str = "sampling") -> list[list[tuple[int, ...]]]:
    """`n` completions (token ids, cut after the first EOS, EOS kept) for each prompt, in prompt order.

    Sequences are sorted by prompt length and left-padded in batches of `batch_size` with an attention
    mask (transformers derives the positions from it). `seed` seeds a forked torch RNG, so the caller's
    random state is left as it was; the same seed, settings and batch size give the same samples.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_new_tokens and batch_size must be >= 1, got {n}, {max_new_tokens}, {batch_size}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} has no token: generation needs at least one")
    device = next(model.parameters()).device
    jobs = sorted(((len(prompt_ids[i]), i, k) for i in range(len(prompt_ids)) for k in range(n)))
    out: list[list[tuple[int, ...]]] = [[()] * n for _ in prompt_ids]
    options: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id)
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    bar = _progress(len(jobs), desc, progress)
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            for s in range(0, len(jobs), batch_size):
                chunk = jobs[s:s + batch_size]
                width = max(length for length, _, _ in chunk)
                ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (length, i, _) in enumerate(chunk):
                    ids[r, width - length:] = torch.tensor(list(prompt_ids[i]), dtype=torch.long)
                    mask[r, width - length:] = 1
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
                for r, (_, i, k) in enumerate(chunk):
                    new = generated[r, width:].tolist()
                    out[i][k] = tuple(new[: new.index(eos_token_id) + 1] if eos_token_id in new else new)
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out


@dataclass(frozen=True)
class Response:
    """One sampled response: its text and the ids it was sampled as (EOS included when generated)."""

    text: str
    ids: tuple[int, ...]


def unique_responses(samples: Sequence[Response]) -> tuple[list[Response], int]:
    """Drop repeated texts (first kept) and empty/whitespace-only responses; returns (kept, empties dropped)."""
    seen: set[str] = set()
    kept, empty = [], 0
    for sample in samples:
        if not sample.text.strip():
            empty += 1
        elif sample.text not in seen:
            seen.add(sample.text)
            kept.append(sample)
    return kept, empty


# ---------------------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------------------


def sequence_logps(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
                   pad_token_id: int = 0, max_tokens_per_batch: int | None = None) -> torch.Tensor:
    """[R] float32 summed log-probs of completion r given prompt r, through `dpo_fast.training.scoring.pair_logps`.

    Completions of the same prompt travel two at a time as the chosen and rejected side of one
    prefix-shared pair (the prompt is run once for both); a leftover one is paired with itself.
    """
    from ..data.pairs import TokenizedPair
    from ..training.scoring import pair_logps

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for r, ids in enumerate(completion_ids):
        if len(ids) == 0:
            raise ValueError(f"completion {r} has no token to score")
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, ids in enumerate(prompt_ids):
        groups.setdefault(tuple(ids), []).append(r)
    pairs, slots = [], []
    for prompt, rows in groups.items():
        for s in range(0, len(rows), 2):
            a, b = rows[s], rows[min(s + 1, len(rows) - 1)]
            pairs.append(TokenizedPair(prompt, tuple(completion_ids[a]), tuple(completion_ids[b])))
            slots.append((a, b))
    if not pairs:
        return torch.zeros(0)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    # pair_logps reads only the pad id from the tokenizer when given TokenizedPair rows.
    pad = types.SimpleNamespace(pad_token_id=pad_token_id, eos_token_id=None)
    first, second = pair_logps(model, pad, pairs, max_length=longest, max_tokens_per_batch=max_tokens_per_batch)
    out = torch.zeros(len(prompt_ids), dtype=torch.float32)
    for (a, b), x, y in zip(slots, first.tolist(), second.tolist()):
        out[a], out[b] = x, y
    return out


class Scorer:
    """Scores every response of every prompt. `name` appears in error messages."""

    name: str = "scorer"

    def score(self, prompts: Sequence[Any], responses: Sequence[Sequence[Response]]) -> list[list[float]]:
        raise NotImplementedError


def _as_number(value: Any, *, scorer: str, prompt_index: int, response_index: int) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number):
            return number
    raise ScorerError(f"scorer {scorer!r} returned {value!r} ({type(value).__name__}) for prompt {prompt_index} "
                      f"(response {response_index}); expected a finite number or a bool")


class CallableScorer(Scorer):
    """f(prompt, response) -> number or bool, one call per response."""

    def __init__(self, fn: Callable[[Any, str], Any], name: str):
        self.fn, self.name = fn, name

    def score(self, prompts, responses):
        out = []
        for i, (prompt, group) in enumerate(zip(prompts, responses)):
            row = []
            for j, response in enumerate(group):
                try:
                    value = self.fn(prompt, response.text)
                except Exception as e:
                    raise ScorerError(f"scorer {self.name!r} raised {type(e).__name__}: {e} on prompt {i} "
                                      f"(response {j}: {response.text!r})") from e
                row.append(_as_number(value, scorer=self.name, prompt_index=i, response_index=j))
            out.append(row)
        return out


class LengthScorer(Scorer):
    name = "length"

    def score(self, prompts, responses):
        return [[float(len(r.text)) for r in group] for group in responses]


class ConfidenceScorer(Scorer):
    """Mean token log-prob of each response under `model`, on the ids it was sampled as."""

    name = "confidence"

    def __init__(self, model, prompt_ids: Sequence[Sequence[int]], pad_token_id: int):
        self.model, self.prompt_ids, self.pad_token_id = model, prompt_ids, pad_token_id

    def score(self, prompts, responses):
        flat = [(i, r) for i, group in enumerate(responses) for r in group]
        sums = sequence_logps(self.model, [self.prompt_ids[i] for i, _ in flat], [r.ids for _, r in flat],
                              pad_token_id=self.pad_token_id)
        means = iter((sums[k] / len(r.ids)).item() for k, (_, r) in enumerate(flat))
        return [[next(means) for _ in group] for group in responses]


class ImplicitRewardScorer(Scorer):
    """beta * (log pi(y|x) - log pi_ref(y|x)) summed over the response's ids (with EOS)."""

    def __init__(self, policy, reference, codec: TextCodec, *, beta: float, name: str = "implicit"):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.policy, self.reference, self.codec, self.beta, self.name = policy, reference, codec, beta, name

    def score(self, prompts, responses):
        prompt_ids, completion_ids = [], []
        for prompt, group in zip(prompts, responses):
            ids = self.codec.encode_prompt(prompt)
            for r in group:
                prompt_ids.append(ids)
                completion_ids.append(self.codec.encode_completion(prompt, r.text))
        pad = self.codec.pad_token_id
        ratio = (sequence_logps(self.policy, prompt_ids, completion_ids, pad_token_id=pad).double()
                 - sequence_logps(self.reference, prompt_ids, completion_ids, pad_token_id=pad).double())
        values = iter((self.beta * ratio).tolist())
        return [[next(values) for _ in group] for group in responses]


class RewardModelScorer(Scorer):
    """A sequence-classification reward model on prompt + response: the logit of its last label."""

    def __init__(self, model, tokenizer, *, name: str = "reward-model", batch_size: int = SCORING_BATCH):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size

    def _text(self, prompt: Any, response: str) -> str:
        if isinstance(prompt, str):
            return prompt + response
        messages = list(prompt) + [{"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def score(self, prompts, responses):
        texts = [self._text(p, r.text) for p, group in zip(prompts, responses) for r in group]
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.model.eval()
        values: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            encoded = [list(self.tokenizer.encode(t, add_special_tokens=True)) for t in texts[s:s + self.batch_size]]
            width = max(len(e) for e in encoded)
            # Right padding: the classifier reads the last non-pad token of each row.
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, e in enumerate(encoded):
                ids[r, :len(e)] = torch.tensor(e)
                mask[r, :len(e)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            values += logits[:, -1].float().cpu().tolist()
        it = iter(values)
        return [[next(it) for _ in group] for group in responses]


def _load_callable(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"scorer {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"scorer {spec!r}: cannot import module {module_name!r}: {e}") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"scorer {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"scorer {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def _load_causal_lm(path: str, what: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(path)).eval()
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path!r} could not be loaded as a causal LM: {e}") from None


def check_scorer_spec(spec: str) -> None:
    """Raise ValueError for a scorer spec that cannot work, without loading any model (a callable is imported)."""
    if spec in BUILTIN_SCORERS:
        return
    if spec.startswith("reward-model:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise ValueError(f"scorer {spec!r}: expected 'reward-model:PATH'")
        return
    if spec.startswith("implicit:"):
        paths = spec.split(":", 1)[1].split(",")
        if len(paths) != 2 or not all(paths):
            raise ValueError(f"scorer {spec!r}: expected 'implicit:POLICY,REF' (two model directories)")
        return
    if ":" in spec:
        _load_callable(spec)
        return
    raise ValueError(f"scorer {spec!r} is not known; expected 'length', 'confidence', 'reward-model:PATH', "
                     "'implicit:POLICY,REF' or a Python callable 'module:function'")


def make_scorer(spec: str | Callable, *, model=None, codec: TextCodec | None = None,
                prompt_ids: Sequence[Sequence[int]] | None = None, beta: float = 0.1) -> Scorer:
    """A `Scorer` from a spec string (module docstring table) or a callable f(prompt, response).

    model / codec / prompt_ids: the sampling model, its codec and the encoded prompts ("confidence" reads
    them; "implicit" uses the codec to tokenize). beta: the implicit reward's scale.
    """
    if isinstance(spec, Scorer):
        return spec
    if callable(spec):
        return CallableScorer(spec, getattr(spec, "__qualname__", repr(spec)))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"scorer must be a non-empty string or a callable, got {spec!r}")
    check_scorer_spec(spec)
    if spec == "length":
        return LengthScorer()
    if spec == "confidence":
        if model is None or codec is None or prompt_ids is None:
            raise ValueError("scorer 'confidence' needs the sampling model, its codec and the prompt ids")
        return ConfidenceScorer(model, prompt_ids, codec.pad_token_id)
    if spec.startswith("reward-model:"):
        path = spec.split(":", 1)[1]
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            rm = AutoModelForSequenceClassification.from_pretrained(os.path.expanduser(path)).eval()
            rm_tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"scorer {spec!r}: {path!r} could not be loaded as a sequence classifier with "
                             f"its tokenizer: {e}") from None
        return RewardModelScorer(rm, rm_tokenizer, name=spec)
    if spec.startswith("implicit:"):
        paths = spec.split(":", 1)[1].split(",")
        if codec is None:
            raise ValueError(f"scorer {spec!r} needs a codec (tokenizer) to tokenize the responses")
        policy = _load_causal_lm(paths[0], f"scorer {spec!r}: policy")
        reference = _load_causal_lm(paths[1], f"scorer {spec!r}: reference")
        return ImplicitRewardScorer(policy, reference, codec, beta=beta, name=spec)
    return CallableScorer(_load_callable(spec), spec)


# ---------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------


def check_pairing(pairing: str) -> None:
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not known; expected one of {', '.join(PAIRINGS)}")


def pair_indices(scores: Sequence[float], pairing: str, *, rng: random.Random | None = None,
                 margin: float = 0.0) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs for one prompt's scores; chosen always scores strictly higher.

    best_vs_worst: the first highest against the first lowest. best_vs_random: the first highest against
    a response drawn by `rng` among those scoring strictly lower. all_pairs_above_margin: every (i, j)
    with scores[i] - scores[j] > margin, in index order.
    """
    check_pairing(pairing)
    if len(scores) < 2 or max(scores) == min(scores):
        return []
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    if pairing == "best_vs_worst":
        return [(best, min(range(len(scores)), key=lambda k: (scores[k], k)))]
    if pairing == "best_vs_random":
        lower = [k for k in range(len(scores)) if scores[k] < scores[best]]
        return [(best, (rng or random.Random(0)).choice(lower))]
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] - scores[j] > margin]


# ---------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SynthReport:
    """What `synthesize` did. ties: prompts with >= 2 distinct responses all scoring the same;
    no_pair: prompts that gave no pair for any reason (ties, fewer than 2 distinct non-empty responses, no
    score gap above the margin)."""

    prompts: int = 0
    sampled: int = 0
    unique: int = 0
    empty: int = 0
    ties: int = 0
    single_response: int = 0
    no_pair: int = 0
    pairs: int = 0
    tie_examples: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.prompts} prompts, {self.sampled} responses sampled, {self.unique} distinct non-empty "
                f"({self.empty} empty dropped) -> {self.pairs} pairs; {self.no_pair} prompts gave no pair "
                f"({self.ties} all-equal-score ties, {self.single_response} with fewer than 2 distinct responses)")


@dataclass
class SynthResult:
    rows: list[dict[str, Any]]
    report: SynthReport
    scores: list[list[float]]
    responses: list[list[Response]]


def synthesize(model, tokenizer, prompts: Sequence[Any], *, scorer: str | Callable | Scorer, n: int = 4,
               pairing: str = "best_vs_worst", margin: float = 0.0, temperature: float = 1.0, top_p: float = 1.0,
               max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16, codec: TextCodec | None = None,
               beta: float = 0.1, progress: bool = False) -> SynthResult:
    """Sample `n` responses per prompt, dedupe, score, pair (see the module docstring). Writes nothing.

    prompts: strings, or message lists (chat models). codec: how prompts become ids (default: `TextCodec`,
    the `tokenize_pair` convention; the sorting task's models use `dpo_fast.demo.setup.TaskCodec`).
    """
    check_pairing(pairing)
    if not prompts:
        raise ValueError("no prompts to sample from")
    if n < 2:
        raise ValueError(f"n must be >= 2 to have responses to compare, got {n}")
    codec = codec or TextCodec(tokenizer)
    prompt_ids = [codec.encode_prompt(p) for p in prompts]
    scorer = make_scorer(scorer, model=model, codec=codec, prompt_ids=prompt_ids, beta=beta)
    sampled = generate_completions(model, prompt_ids, eos_token_id=codec.eos_token_id,
                                   pad_token_id=codec.pad_token_id, n=n, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                   progress=progress)
    report = SynthReport(prompts=len(prompts), sampled=len(prompts) * n)
    responses = []
    for group in sampled:
        kept, empty = unique_responses([Response(codec.decode(ids), ids) for ids in group])
        responses.append(kept)
        report.unique += len(kept)
        report.empty += empty
    scores = scorer.score(list(prompts), responses)
    if len(scores) != len(prompts) or any(len(s) != len(r) for s, r in zip(scores, responses)):
        raise ScorerError(f"scorer {scorer.name!r} returned scores that do not match the responses one to one")
    rng = random.Random(seed)
    rows = []
    for i, (prompt, group, group_scores) in enumerate(zip(prompts, responses, scores)):
        chosen_pairs = pair_indices(group_scores, pairing, rng=rng, margin=margin)
        if not chosen_pairs:
            report.no_pair += 1
            if len(group) < 2:
                report.single_response += 1
            elif max(group_scores) == min(group_scores):
                report.ties += 1
                if len(report.tie_examples) < 5:
                    report.tie_examples.append(i)
        for a, b in chosen_pairs:
            rows.append({"prompt": prompt, "chosen": group[a].text, "rejected": group[b].text,
                         "score_chosen": group_scores[a], "score_rejected": group_scores[b]})
    report.pairs = len(rows)
    return SynthResult(rows=rows, report=report, scores=scores, responses=responses)


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """JSON lines, written to a temporary file next to `path` then moved into place."""
    from ..training.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def read_prompts(source: str, *, limit: int | None = None) -> list[Any]:
    """Prompts from a .jsonl file (a "prompt" field per row: string or message list) or a .txt file (one per
    non-blank line). The command line also takes "demo", the sorting task's prompts
    (`dpo_fast.demo.setup.demo_prompts`)."""
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {source!r} does not exist (expected a .jsonl or .txt file, or 'demo')")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if path.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"prompt file {source!r} line {number}: not valid JSON ({e})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
                raise ValueError(f"prompt file {source!r} line {number}: expected a record with a non-empty "
                                 f"'prompt' string or message list, got {line[:80]!r}")
            prompts.append(prompt)
    elif path.endswith(".txt"):
        prompts = [line for line in lines if line.strip()]
    else:
        raise ValueError(f"prompt file {source!r}: expected a .jsonl or .txt file, or 'demo'")
    if not prompts:
        raise ValueError(f"prompt file {source!r} holds no prompt")
    return first_prompts(prompts, limit)


def first_prompts(prompts: list[Any], limit: int | None) -> list[Any]:
    """The first `limit` prompts (all of them for None)."""
    if limit is None:
        return prompts
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return prompts[:limit]
