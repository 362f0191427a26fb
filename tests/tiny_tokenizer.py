"""A tiny byte-level BPE tokenizer built in code, for tests that must not download anything.

`make_tokenizer()` returns a fresh `PreTrainedTokenizerFast` (callers may mutate it, e.g. drop the chat
template) over one fixed vocabulary, trained once per process in well under a second on synthetic
sentences that use the words, markers and newlines preference data is made of, so that multi-character
merges exist (including ones that a prompt/completion boundary can split).

Special tokens: <pad> (pad), <bos> (bos; only prepended when `bos=True`), <|im_start|>, and <|im_end|>,
which is the EOS token as in ChatML models. The chat template is ChatML:

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... [<|im_start|>assistant\\n]
"""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, IM_START, IM_END = "<pad>", "<bos>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words the tests build prompts and answers from; common enough in the corpus to become whole tokens.
WORDS = (
    "hello world the a cat dog sat on mat sun moon blue red green house tree river water fire "
    "question answer please thanks sure sorry maybe yes no because think know help write story poem "
    "Human Assistant system user assistant explain number one two three four five seven eleven "
    "python code function return value list string token model language learning preference"
).split()
VOCAB_SIZE = 600


def _corpus(num_sentences: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        if rng.random() < 0.3:
            sentence = f"\n\nHuman: {sentence}\n\nAssistant: {' '.join(rng.choices(WORDS, k=5))}."
        if rng.random() < 0.2:
            sentence += "\n" + rng.choice(WORDS)
        sentences.append(sentence)
    return sentences


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    # Cached as JSON so every call builds an independent object from the same deterministic vocabulary.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def make_tokenizer(chat_template: bool = True, *, bos: bool = False) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer. chat_template=False leaves `chat_template` None (a base model's tokenizer);
    bos=True makes plain encoding prepend <bos>, like Llama-style tokenizers."""
    tok = Tokenizer.from_str(_trained_tokenizer_json())
    if bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        name_or_path="tiny-bpe" + ("-chatml" if chat_template else ""),
    )
    tokenizer.chat_template = CHATML_TEMPLATE if chat_template else None
    return tokenizer
