"""Preference rows -> `TokenizedPair`s: one prompt token sequence shared by both responses.

Rows are `load_preferences` rows: text (prompt, chosen, rejected strings) or chat (message lists; the
prompt holds every earlier turn, the completions the final assistant turn). A chat prompt given with
string completions takes them as assistant turns.

How the prompt/completion split is made
---------------------------------------
Text is rendered first, then tokenized. For text rows the texts are the fields themselves; for chat rows
the prompt text is the chat template applied to the prompt messages with `add_generation_prompt=True`,
and a completion's text is what the template renders for the whole conversation (prompt + completion)
after that prompt text. The full render must start with the prompt render, otherwise the template
rewrites earlier turns depending on what follows (e.g. drops reasoning) and there is no single shared
prompt: that raises ValueError naming the row.

The prompt text is tokenized once, so it is identical for both responses by construction. A completion's
ids are the ids of prompt+completion text after the prompt's ids, when the prompt's ids are a prefix of
them: this keeps the tokenization the text has as one continuous string (for SentencePiece-style
tokenizers, tokenizing the completion alone could add a leading space it does not have). When a BPE merge
crosses the boundary (the prompt ends "...hel", the completion starts "lo", and "hello" is one token) the
prefix check fails and the completion is tokenized alone instead; the prompt ids stay those of the prompt
alone, which is exactly what the model is conditioned on at generation time (counted in
`TokenizeStats.boundary_fallbacks`).

Special tokens: text prompts start with what the tokenizer's post-processor puts in front (e.g. BOS);
chat renders carry their own special tokens, so they are tokenized without additions. Every completion
ends with EOS: appended unless its ids already end with it. A chat completion that renders as
"...<eos>" followed by whitespace (ChatML's "<|im_end|>\\n") is cut after the EOS, where generation stops.

Truncation to `max_length` (each prompt+completion sequence, so prompt + longest completion <= max_length)
-------------------------------------------------------------------------------------------------------
1. The prompt is cut first. With `max_prompt_length` it is capped at that many tokens and keeps them
   (that is the room reserved for the context); without it, it gives way down to 1 token.
   truncation="keep_end" keeps its last tokens (nearest the response; default) and a leading BOS;
   "keep_start" keeps its first tokens.
2. Then the completions are cut to what is left, keeping their start. A cut completion does not end
   with EOS: the text goes on, and the model must not learn to stop there.
A pair that would be left with no prompt token or no completion token, or whose two completions become
identical (no preference left to learn), is dropped (`tokenize_pair` returns None) and counted.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pairs import TokenizedPair

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")
MAX_REPORTED_EXAMPLES = 5
# Rows whose texts go to the tokenizer in one call (parallel encoding without holding many texts at once).
ROWS_PER_CALL = 256


@dataclass
class TokenizeStats:
    """What `tokenize_dataset` did. dropped: count per reason; examples: (row index, reason) of the
    first dropped rows. prompts_truncated / completions_truncated: pairs whose prompt / completions were
    cut. boundary_fallbacks: completions tokenized alone because a merge crossed the prompt boundary.
    longest_sequence: the longest prompt+completion emitted, in tokens."""

    rows: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)
    prompts_truncated: int = 0
    completions_truncated: int = 0
    pairs_truncated: int = 0
    boundary_fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    longest_sequence: int = 0
    longest_prompt_cut: int = 0
    longest_completion_cut: int = 0

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        text = (
            f"{self.rows} rows -> {self.pairs} pairs ({self.prompt_tokens} prompt + {self.completion_tokens} "
            f"completion tokens, longest sequence {self.longest_sequence}); truncated: {self.prompts_truncated} "
            f"prompts, {self.completions_truncated} completion pairs; boundary fallbacks: {self.boundary_fallbacks}"
        )
        if self.num_dropped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.dropped.most_common())
            first = "; ".join(f"row {index}: {reason}" for index, reason in self.examples)
            text += f"; dropped {self.num_dropped} ({reasons}). First: {first}"
        return text


@dataclass
class TokenizeOutcome:
    """What became of one row: its pair, or None and the reason it was dropped (e.g. "empty chosen
    completion", "chosen and rejected token ids identical after truncation"); whether its prompt or
    completions were cut, and their lengths before the cut."""

    pair: TokenizedPair | None
    drop_reason: str | None = None
    prompt_truncated: bool = False
    completion_truncated: bool = False
    boundary_fallbacks: int = 0
    prompt_length: int = 0
    completion_length: int = 0  # the longer completion, before truncation


def tokenize_pair(
    tokenizer: Any,
    row: Mapping[str, Any],
    *,
    max_length: int = 1024,
    truncation: str = "keep_end",
    max_prompt_length: int | None = None,
    index: int = -1,
) -> TokenizedPair | None:
    """Tokenizes one preference row (see the module doc); None when the pair is dropped.

    tokenizer: a transformers tokenizer (fast or slow) with an EOS token, and a chat template for chat rows.
    row: {"prompt", "chosen", "rejected"} as produced by `load_preferences`.
    max_length: the longest prompt+completion sequence; truncation: "keep_end" or "keep_start" (prompt);
    max_prompt_length: prompt cap and reserved prompt room; index: stored in the pair and named in errors.
    """
    return tokenize_row(tokenizer, row, max_length=max_length, truncation=truncation,
                        max_prompt_length=max_prompt_length, index=index).pair


def tokenize_row(
    tokenizer: Any,
    row: Mapping[str, Any],
    *,
    max_length: int = 1024,
    truncation: str = "keep_end",
    max_prompt_length: int | None = None,
    index: int = -1,
) -> TokenizeOutcome:
    """`tokenize_pair` that also says why a row was dropped (`TokenizeOutcome.drop_reason`) and what was cut."""
    _check_options(max_length, truncation, max_prompt_length)
    (outcome,) = _Tokenizer(tokenizer).tokenize_many([(index, row)], max_length, truncation, max_prompt_length)
    return outcome


def tokenize_dataset(
    tokenizer: Any,
    dataset: Iterable[Mapping[str, Any]],
    *,
    max_length: int = 1024,
    truncation: str = "keep_end",
    max_prompt_length: int | None = None,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenizes every row of `dataset` (a `load_preferences` Dataset or any iterable of rows); pair.index
    is the row's position. Returns the kept pairs and the stats (also logged)."""
    _check_options(max_length, truncation, max_prompt_length)
    worker = _Tokenizer(tokenizer)
    pairs: list[TokenizedPair] = []
    stats = TokenizeStats()
    outcomes = (
        outcome
        for chunk in _chunks(enumerate(dataset), ROWS_PER_CALL)
        for outcome in worker.tokenize_many(chunk, max_length, truncation, max_prompt_length)
    )
    for index, outcome in enumerate(outcomes):
        stats.rows += 1
        stats.boundary_fallbacks += outcome.boundary_fallbacks
        if outcome.pair is None:
            stats.dropped[outcome.drop_reason] += 1
            if len(stats.examples) < MAX_REPORTED_EXAMPLES:
                stats.examples.append((index, outcome.drop_reason))
            continue
        pair = outcome.pair
        pairs.append(pair)
        stats.pairs += 1
        stats.prompts_truncated += outcome.prompt_truncated
        stats.completions_truncated += outcome.completion_truncated
        stats.pairs_truncated += outcome.prompt_truncated or outcome.completion_truncated
        if outcome.prompt_truncated:
            stats.longest_prompt_cut = max(stats.longest_prompt_cut, outcome.prompt_length)
        if outcome.completion_truncated:
            stats.longest_completion_cut = max(stats.longest_completion_cut, outcome.completion_length)
        stats.prompt_tokens += len(pair.prompt_ids)
        stats.completion_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
        stats.longest_sequence = max(
            stats.longest_sequence, len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
        )
    (logger.warning if stats.num_dropped else logger.info)("tokenized %s", stats.summary())
    return pairs, stats


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _check_options(max_length: int, truncation: str, max_prompt_length: int | None) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (one prompt and one completion token), got {max_length!r}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation={truncation!r} is not known; expected one of {', '.join(TRUNCATION_MODES)}")
    if max_prompt_length is not None and (
        isinstance(max_prompt_length, bool)
        or not isinstance(max_prompt_length, int)
        or not 1 <= max_prompt_length < max_length
    ):
        raise ValueError(
            f"max_prompt_length must be None or an int in [1, max_length={max_length}) so that completions keep "
            f"at least one token, got {max_prompt_length!r}"
        )


class _Tokenizer:
    """The per-tokenizer facts, looked up once: its name for errors, EOS/BOS ids, the special tokens its
    post-processor puts in front of plain text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.eos_id = tokenizer.eos_token_id
        self.eos_token = tokenizer.eos_token
        if self.eos_id is None:
            raise ValueError(f"tokenizer {self.name!r} has no eos_token: completions must end with EOS; set one")
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.text_prefix = self._special_prefix()

    def _special_prefix(self) -> list[int]:
        probe = "a"
        bare = self.encode(probe)
        full = list(self.tokenizer.encode(probe, add_special_tokens=True))
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start]
        return []

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        # One call for many texts: fast tokenizers encode a batch in parallel.
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def tokenize_many(
        self,
        indexed_rows: Sequence[tuple[int, Mapping[str, Any]]],
        max_length: int,
        truncation: str,
        max_prompt_length: int | None,
    ) -> list[TokenizeOutcome]:
        rendered = [self._render(row, index) for index, row in indexed_rows]
        texts = []
        for prompt_text, completion_texts, _ in rendered:
            texts += [prompt_text, *(prompt_text + text for text in completion_texts)]
        encoded = iter(self.encode_many(texts))
        outcomes = []
        for (index, _), (_, completion_texts, is_chat) in zip(indexed_rows, rendered):
            prompt_core, *fulls = (next(encoded) for _ in range(3))
            outcomes.append(self._assemble(index, prompt_core, fulls, completion_texts, is_chat, max_length,
                                           truncation, max_prompt_length))
        return outcomes

    def _assemble(
        self,
        index: int,
        prompt_core: list[int],
        fulls: list[list[int]],
        completion_texts: list[str],
        is_chat: bool,
        max_length: int,
        truncation: str,
        max_prompt_length: int | None,
    ) -> TokenizeOutcome:
        for name, text in zip(("chosen", "rejected"), completion_texts):
            if not text.strip():
                return TokenizeOutcome(None, f"empty {name} completion")
        prompt_ids = prompt_core if is_chat else self.text_prefix + prompt_core
        completions = []
        fallbacks = 0
        for text, full in zip(completion_texts, fulls):
            if full[: len(prompt_core)] == prompt_core and len(full) > len(prompt_core):
                ids = full[len(prompt_core) :]
            else:  # a merge crossed the boundary: keep the prompt's own ids, tokenize the completion alone
                ids = self.encode(text)
                fallbacks += 1
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            completions.append(ids)

        outcome = _truncate(prompt_ids, completions, max_length, truncation, max_prompt_length, self.bos_id)
        outcome.boundary_fallbacks = fallbacks
        if outcome.pair is not None:
            outcome.pair = TokenizedPair(
                outcome.pair.prompt_ids, outcome.pair.chosen_ids, outcome.pair.rejected_ids, index=index
            )
        return outcome

    def _render(self, row: Mapping[str, Any], index: int) -> tuple[str, list[str], bool]:
        if not isinstance(row, Mapping):
            raise TypeError(f"row {index}: expected a {{prompt, chosen, rejected}} record, got {type(row).__name__}")
        missing = [key for key in ("prompt", "chosen", "rejected") if row.get(key) is None]
        if missing:
            raise ValueError(f"row {index}: missing {missing} (expected prompt, chosen, rejected)")
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(prompt, str):
            for name, value in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(value, str):
                    raise TypeError(
                        f"row {index}: the prompt is a string, so {name} must be a string too, got "
                        f"{type(value).__name__} (a chat row has a message-list prompt)"
                    )
            return prompt, [chosen, rejected], False
        if not isinstance(prompt, list):
            raise TypeError(f"row {index}: prompt must be a string or a message list, got {type(prompt).__name__}")
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"tokenizer {self.name!r} has no chat_template, but row {index} is a conversation (message lists); "
                "use a chat/instruct model's tokenizer, set tokenizer.chat_template, or give plain-text rows"
            )
        prompt_text = self._apply_template(prompt, True)
        texts = []
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
            if not isinstance(messages, list):
                raise TypeError(f"row {index}: {name} must be a message list or a string, got {type(value).__name__}")
            full_text = self._apply_template(list(prompt) + list(messages), False)
            if not full_text.startswith(prompt_text):
                at = _first_difference(full_text, prompt_text)
                raise ValueError(
                    f"row {index}: the chat template of tokenizer {self.name!r} renders the conversation with "
                    f"{name} so that it does not start with the rendered prompt (they differ at character {at}: "
                    f"{prompt_text[at:at + 40]!r} vs {full_text[at:at + 40]!r}), so there is no prompt shared by "
                    "both responses; use a template that renders earlier turns independently of later ones"
                )
            text = full_text[len(prompt_text) :]
            stripped = text.rstrip()
            if self.eos_token and stripped.endswith(self.eos_token):
                text = stripped  # generation stops at EOS: what the template adds after it is never produced
            texts.append(text)
        return prompt_text, texts, True

    def _apply_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise TypeError(
                f"tokenizer {self.name!r}: apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
            )
        return text


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _truncate(
    prompt_ids: list[int],
    completions: list[list[int]],
    max_length: int,
    truncation: str,
    max_prompt_length: int | None,
    bos_id: int | None,
) -> TokenizeOutcome:
    longest = max(len(c) for c in completions)
    cap = len(prompt_ids) if max_prompt_length is None else min(len(prompt_ids), max_prompt_length)
    floor = cap if max_prompt_length is not None else min(cap, 1)
    keep = max(floor, min(cap, max_length - longest))
    budget = max_length - keep
    if keep < 1:
        return TokenizeOutcome(None, "no prompt tokens")
    if budget < 1:
        return TokenizeOutcome(None, "no room for the completion")

    prompt = prompt_ids
    if keep < len(prompt_ids):
        if truncation == "keep_start":
            prompt = prompt_ids[:keep]
        elif bos_id is not None and prompt_ids[0] == bos_id and keep >= 2:
            prompt = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1 :]
        else:
            prompt = prompt_ids[len(prompt_ids) - keep :]
    chosen, rejected = (c[:budget] for c in completions)
    if chosen == rejected:
        cut = " after truncation" if longest > budget else ""
        return TokenizeOutcome(None, f"chosen and rejected token ids identical{cut}")
    return TokenizeOutcome(
        TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected)),
        prompt_truncated=len(prompt) < len(prompt_ids),
        completion_truncated=longest > budget,
        prompt_length=len(prompt_ids),
        completion_length=longest,
    )
