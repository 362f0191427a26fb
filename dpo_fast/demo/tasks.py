"""A verifiable synthetic preference task for demos and convergence checks: sorting distinct digits.

Prompt ``"sort 3 1 2 ="``, correct completion ``" 1 2 3"``. Every answer can be checked by a program
(`verify`), so a model's greedy accuracy is an exact number, not a judge's opinion. Rejected answers
are plausible mistakes (`corrupt`):

- ``swap_last``: the last two numbers swapped (the "bad habit" the demo's SFT data teaches);
- ``swap``: another adjacent pair swapped;
- ``off_by_one``: one number one too high or too low.

Also here: a character-level tokenizer built in code (no download), and the generation and
evaluation helpers the demo uses (greedy/sampled decoding, per-sequence log-probs, implicit rewards,
KL to the reference). They work with any Hugging Face causal LM whose forward takes ``input_ids``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.pairs import IGNORE_INDEX, TokenizedPair

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Every character a prompt or an answer of the sorting task can contain.
TASK_CHARS = "0123456789 =sort"
ERROR_KINDS = ("swap_last", "swap", "off_by_one")

_PROMPT_RE = re.compile(r"^sort((?: [0-9])+) =$")


def build_tokenizer(chars: str = TASK_CHARS):
    """A character-level `PreTrainedTokenizerFast`: one id per character, plus pad/bos/eos/unk.

    Ids 0..3 are the special tokens (in `SPECIAL_TOKENS` order), then the distinct characters of
    `chars` in order. `encode(text, add_special_tokens=False)` gives one id per character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Isolate every character (spaces included) so that each one is a word of the WordLevel model.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Concatenate on decode: the default decoder would put spaces between the characters.
    core.decoder = decoders.Fuse()
    # BOS first when special tokens are asked for, as the task's own encoding does (`encode_prompt`), so
    # generic tokenization (`dpo_fast.data.tokenization`, `dpo-fast score/rank/train`) conditions the same way.
    core.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                                        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
    )


# ---------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------


def format_prompt(digits: Sequence[int]) -> str:
    """(3, 1, 2) -> 'sort 3 1 2 ='."""
    return "sort " + " ".join(str(d) for d in digits) + " ="


def format_answer(digits: Sequence[int]) -> str:
    """(1, 2, 3) -> ' 1 2 3' (the completion that follows the prompt)."""
    return "".join(f" {d}" for d in digits)


def parse_prompt(prompt: str) -> tuple[int, ...]:
    """'sort 3 1 2 =' -> (3, 1, 2); a prompt not of that form raises ValueError."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a sorting prompt of the form 'sort 3 1 2 ='")
    return tuple(int(tok) for tok in match.group(1).split())


def correct_answer(prompt: str) -> str:
    return format_answer(sorted(parse_prompt(prompt)))


def verify(prompt: str, completion: str) -> bool:
    """True when `completion` is exactly the sorted digits of `prompt` (surrounding whitespace ignored)."""
    return completion.strip() == correct_answer(prompt).strip()


def corrupt(prompt: str, kind: str, rng: random.Random) -> str:
    """A plausible wrong completion for `prompt`, always different from the correct one.

    kind: 'swap_last' (last two numbers swapped), 'swap' (another adjacent pair swapped) or
    'off_by_one' (one number replaced by a neighbour value).
    """
    if kind not in ERROR_KINDS:
        raise ValueError(f"kind={kind!r} is not known; expected one of {', '.join(ERROR_KINDS)}")
    answer = sorted(parse_prompt(prompt))
    if len(answer) < 3:
        raise ValueError(f"prompt {prompt!r} has {len(answer)} numbers; corrupting needs at least 3")
    wrong = list(answer)
    if kind == "swap_last":
        wrong[-2], wrong[-1] = wrong[-1], wrong[-2]
    elif kind == "swap":
        i = rng.randrange(len(wrong) - 2)  # pairs (i, i+1) before the last one
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        i = rng.randrange(len(wrong))
        options = [v for v in (wrong[i] - 1, wrong[i] + 1) if 0 <= v <= 9]
        wrong[i] = rng.choice(options)
    # Distinct digits make every swap a change, and +-1 always changes the value.
    assert wrong != answer
    return format_answer(wrong)


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint train and held-out prompts."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]


def make_prompts(num_train: int, num_held_out: int, *, seed: int, min_len: int = 3, max_len: int = 5) -> TaskSplits:
    """Random sorting prompts of `min_len..max_len` distinct digits; no held-out prompt is in train."""
    if not 3 <= min_len <= max_len <= 10:
        raise ValueError(f"need 3 <= min_len <= max_len <= 10, got min_len={min_len}, max_len={max_len}")
    if num_train < 1 or num_held_out < 1:
        raise ValueError(f"num_train and num_held_out must be >= 1, got {num_train} and {num_held_out}")
    capacity = sum(_permutations(10, k) for k in range(min_len, max_len + 1))
    if num_train + num_held_out > capacity // 2:
        raise ValueError(f"asked for {num_train + num_held_out} prompts but only {capacity} exist for lengths "
                         f"{min_len}..{max_len}; ask for fewer than half of them")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    prompts: list[str] = []
    while len(prompts) < num_train + num_held_out:
        digits = tuple(rng.sample(range(10), rng.randint(min_len, max_len)))
        if digits not in seen:
            seen.add(digits)
            prompts.append(format_prompt(digits))
    return TaskSplits(train=tuple(prompts[:num_train]), held_out=tuple(prompts[num_train:]))


def _permutations(n: int, k: int) -> int:
    out = 1
    for i in range(k):
        out *= n - i
    return out


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str


def make_preference_rows(prompts: Sequence[str], *, seed: int,
                         error_mix: dict[str, float] | None = None) -> list[PreferenceRow]:
    """One (prompt, correct, wrong) row per prompt; the kind of mistake is drawn from `error_mix`.

    error_mix: kind -> weight (default: mostly the 'swap_last' habit, some of the other mistakes).
    """
    mix = error_mix or {"swap_last": 0.6, "swap": 0.2, "off_by_one": 0.2}
    unknown = set(mix) - set(ERROR_KINDS)
    if unknown:
        raise ValueError(f"error_mix has unknown kinds {sorted(unknown)}; expected some of {', '.join(ERROR_KINDS)}")
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    rows = []
    for prompt in prompts:
        kind = rng.choices(kinds, weights)[0]
        rows.append(PreferenceRow(prompt, correct_answer(prompt), corrupt(prompt, kind, rng)))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """BOS + one id per character."""
    return [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """One id per character + EOS."""
    return [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]


def tokenize_row(tokenizer, row: PreferenceRow, index: int = -1) -> TokenizedPair:
    return TokenizedPair(
        prompt_ids=tuple(encode_prompt(tokenizer, row.prompt)),
        chosen_ids=tuple(encode_completion(tokenizer, row.chosen)),
        rejected_ids=tuple(encode_completion(tokenizer, row.rejected)),
        index=index,
    )


def pad_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[Tensor, Tensor]:
    """Right-padded [R, T] input ids (prompt + completion) and labels aligned with the outputs.

    labels[r, t] is the token that position t predicts when that token belongs to the completion,
    IGNORE_INDEX elsewhere: the prompt is context, not scored.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(p) - 1 : len(seq) - 1] = torch.tensor(list(c))
    return ids, labels


# ---------------------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------------------


def model_device(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return torch.device("cpu") if first is None else first.device


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 12, greedy: bool = True,
                 generator: torch.Generator | None = None, batch_size: int = 256) -> list[list[int]]:
    """Completion token ids for `prompts` (EOS included when reached), greedy or sampled at temperature 1.

    Prompts are grouped by length, so no padding is needed; each step reruns the whole prefix (the
    sequences are a few dozen tokens, a cache would not pay for its bookkeeping).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    try:
        for _, members in sorted(by_len.items()):
            for s in range(0, len(members), batch_size):
                rows = members[s : s + batch_size]
                seq = torch.tensor([encoded[i] for i in rows], dtype=torch.long)
                start = seq.shape[1]
                done = torch.zeros(len(rows), dtype=torch.bool)
                for _ in range(max_new_tokens):
                    # Sequences stay on the CPU (so does the generator); the forward runs on the model's device.
                    logits = model(input_ids=seq.to(device)).logits[:, -1, :].float().cpu()
                    if greedy:
                        nxt = logits.argmax(-1)
                    else:
                        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
                    seq = torch.cat([seq, nxt[:, None]], dim=1)
                    done |= nxt == eos
                    if bool(done.all()):
                        break
                for r, i in enumerate(rows):
                    new = seq[r, start:].tolist()
                    out[i] = new[: new.index(eos) + 1] if eos in new else new
    finally:
        model.train(was_training)
    return out


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    """Completion ids -> text, special tokens (EOS, stray pad/bos) dropped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def generate(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """`generate_ids`, decoded to text."""
    return [decode_completion(tokenizer, ids) for ids in generate_ids(model, tokenizer, prompts, **kwargs)]


def exact_match_accuracy(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Fraction of completions that `verify` accepts."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many completions as prompts (> 0), got {len(prompts)} and {len(completions)}")
    return sum(verify(p, c) for p, c in zip(prompts, completions)) / len(prompts)


@torch.no_grad()
def token_logps(model, input_ids: Tensor, labels: Tensor) -> Tensor:
    """[R, T] -> [R, T] float32 log-probs of the labels under `model` (0 where the label is ignored), on the CPU."""
    logits = model(input_ids=input_ids.to(model_device(model))).logits.float().cpu()
    mask = labels != IGNORE_INDEX
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                     batch_size: int = 256) -> Tensor:
    """[R] summed log-probs of each completion (+ EOS) given its prompt."""
    out = []
    for s in range(0, len(prompts), batch_size):
        p_ids = [encode_prompt(tokenizer, p) for p in prompts[s : s + batch_size]]
        c_ids = [encode_completion(tokenizer, c) for c in completions[s : s + batch_size]]
        ids, labels = pad_sequences(p_ids, c_ids, tokenizer.pad_token_id)
        out.append(token_logps(model, ids, labels).sum(-1))
    return torch.cat(out)


@dataclass(frozen=True)
class PreferenceMetrics:
    """Implicit-reward statistics of a policy against its reference on preference rows.

    reward_accuracy: fraction of rows where beta*log(pi/pi_ref) of the chosen answer is strictly above
        the rejected one's (so 0 when policy == reference: no preference has been learned yet).
    margin: mean of chosen reward - rejected reward.
    """

    reward_accuracy: float
    margin: float
    chosen_reward: float
    rejected_reward: float


def preference_metrics(policy, reference, tokenizer, rows: Sequence[PreferenceRow], *, beta: float
                       ) -> PreferenceMetrics:
    prompts = [r.prompt for r in rows]
    chosen = [r.chosen for r in rows]
    rejected = [r.rejected for r in rows]
    rc = completion_logps(policy, tokenizer, prompts, chosen) - completion_logps(reference, tokenizer, prompts, chosen)
    rr = (completion_logps(policy, tokenizer, prompts, rejected)
          - completion_logps(reference, tokenizer, prompts, rejected))
    chosen_rewards, rejected_rewards = beta * rc.double(), beta * rr.double()
    return PreferenceMetrics(
        reward_accuracy=float((chosen_rewards > rejected_rewards).double().mean()),
        margin=float((chosen_rewards - rejected_rewards).mean()),
        chosen_reward=float(chosen_rewards.mean()),
        rejected_reward=float(rejected_rewards.mean()),
    )


def mean_token_kl(policy, reference, tokenizer, prompts: Sequence[str], completion_ids: Sequence[Sequence[int]]
                  ) -> float:
    """Mean over completion tokens of log pi(y_t) - log pi_ref(y_t).

    With `completion_ids` sampled from the policy (`generate_ids(..., greedy=False)`) this is a Monte
    Carlo estimate of the per-token KL(pi || pi_ref) along the policy's own outputs; it is exactly 0
    when policy == reference.
    """
    if len(prompts) != len(completion_ids) or not prompts:
        raise ValueError(f"need as many completions as prompts (> 0), got {len(prompts)} and {len(completion_ids)}")
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    ids, labels = pad_sequences(p_ids, completion_ids, tokenizer.pad_token_id)
    scored = int((labels != IGNORE_INDEX).sum())
    if scored == 0:
        raise ValueError("completion_ids are all empty: there is no token to measure the KL on")
    diff = token_logps(policy, ids, labels).double() - token_logps(reference, ids, labels).double()
    return float(diff.sum() / scored)
