"""Synthetic preference data for the end-to-end benchmark: a BPE tokenizer built in code, two profiles.

Nothing is downloaded. A vocabulary of pseudo-words (syllables drawn by a seeded RNG) feeds a byte-level
BPE trained in a second or two to `vocab_size` tokens, so the model's lm_head has a realistic width. Pairs
are tokenized piecewise (chat-template markers, prompt text, each completion text plus EOS), so every
contender receives exactly the same token ids and no prompt/completion boundary is re-tokenized.

Profiles (token lengths drawn uniformly around these means):

- ``long``: long shared prompts, prompt:completion about 4:1, like multi-turn hh-rlhf conversations.
- ``short``: short prompts, prompt:completion about 0.4:1, like UltraFeedback instructions.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpo_fast.data.pairs import TokenizedPair

PAD, BOS, IM_START, IM_END = "<pad>", "<bos>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, IM_START, IM_END)
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


@dataclasses.dataclass(frozen=True)
class Profile:
    """Mean token lengths of a data profile; each drawn uniformly in mean * [1 - spread, 1 + spread]."""

    name: str
    prompt_tokens: int
    completion_tokens: int
    spread: float = 0.4


PROFILES = {
    "long": Profile("long", prompt_tokens=256, completion_tokens=64),
    "short": Profile("short", prompt_tokens=64, completion_tokens=160),
}


def scaled_profile(profile: Profile, pair_tokens: int) -> Profile:
    """The profile's prompt:completion ratio, prompt + completion scaled to about `pair_tokens`."""
    if pair_tokens < 16:
        raise ValueError(f"pair_tokens must be >= 16, got {pair_tokens}")
    total = profile.prompt_tokens + profile.completion_tokens
    prompt = max(4, round(pair_tokens * profile.prompt_tokens / total))
    return dataclasses.replace(
        profile, prompt_tokens=prompt, completion_tokens=max(4, pair_tokens - prompt), spread=0.0
    )


def search_profile(pair_tokens: int) -> Profile:
    """The length search's pairs: prompt 3/4 and each completion 1/4 of `pair_tokens`, no spread."""
    if pair_tokens < 16:
        raise ValueError(f"pair_tokens must be >= 16, got {pair_tokens}")
    prompt = 3 * pair_tokens // 4
    return Profile("search", prompt_tokens=prompt, completion_tokens=pair_tokens - prompt, spread=0.0)


def _words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _sentences(words: list[str], count: int, rng: random.Random) -> list[str]:
    # Zipf-like word frequencies, as in natural text: a few words very common, a long tail.
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    out = []
    for _ in range(count):
        picked = rng.choices(words, weights=weights, k=rng.randint(4, 18))
        out.append(" ".join(picked).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    rng = random.Random(1)
    corpus = _sentences(_words(3000, seed=0), 6000, rng)
    # The chat-template role lines, so that each becomes a single token or two as in real tokenizers.
    corpus += ["user\n", "assistant\n", "\n"] * 200
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer of at most `vocab_size` tokens; EOS is <|im_end|> (ChatML)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        name_or_path=f"bench-bpe-{vocab_size}",
    )


def _text_ids(
    tokenizer: PreTrainedTokenizerFast,
    words: list[str],
    weights: list[float],
    length: int,
    rng: random.Random,
) -> list[int]:
    """About `length` tokens of synthetic text: sentences are added until the length is reached, then cut."""
    ids: list[int] = []
    while len(ids) < length:
        picked = rng.choices(words, weights=weights, k=rng.randint(4, 18))
        sentence = " ".join(picked).capitalize() + rng.choice([".", "?", "!"]) + " "
        ids.extend(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    return ids[:length]


def make_pairs(
    tokenizer: PreTrainedTokenizerFast, profile: Profile, num_pairs: int, *, seed: int = 0
) -> list[TokenizedPair]:
    """`num_pairs` pairs of the profile: a ChatML user prompt, two different completions ending in EOS."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = random.Random(seed)
    words = _words(3000, seed=0)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    im_start, eos = tokenizer.convert_tokens_to_ids(IM_START), tokenizer.eos_token_id
    head, tail = [im_start] + encode("user\n"), [eos] + encode("\n") + [im_start] + encode("assistant\n")
    markers = len(head) + len(tail)  # the prompt lengths of the profile include these

    def draw(mean: int) -> int:
        return max(1, rng.randint(round(mean * (1 - profile.spread)), round(mean * (1 + profile.spread))))

    pairs = []
    for index in range(num_pairs):
        body = max(1, draw(profile.prompt_tokens) - markers)
        prompt = head + _text_ids(tokenizer, words, weights, body, rng) + tail
        chosen = _text_ids(tokenizer, words, weights, draw(profile.completion_tokens) - 1, rng) + [eos]
        rejected = _text_ids(tokenizer, words, weights, draw(profile.completion_tokens) - 1, rng) + [eos]
        pairs.append(TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), index=index))
    return pairs


def real_tokens(pair: TokenizedPair) -> int:
    """Distinct tokens of a pair: the prompt once, both completions (what any layout must compute)."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
