"""The demo's pieces that the evaluation tools reuse: its SFT starting point and training pairs
(`demo_setup`), its DPO configuration (`demo_config`), its training prompts (`demo_prompts`) and the sorting
task's encoding (`TaskCodec`), for `dpo-fast sweep --demo` and `dpo-fast synth --model demo --prompts demo`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.pairs import TokenizedPair
from ..evaluation.synth import TextCodec, first_prompts
from ..training.config import DPOConfig
from . import run as demo
from . import tasks


@dataclass
class DemoSetup:
    model: Any
    tokenizer: Any
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    settings: Any


def demo_setup(settings=None, *, log=print) -> DemoSetup:
    """The demo's tokenizer, its SFT model (`dpo_fast.demo.run.build_model` + `sft`) and its train/held-out pairs,
    exactly as `dpo-fast demo` builds them before DPO."""
    settings = settings or demo.DemoSettings()
    torch.manual_seed(settings.seed)
    tokenizer = tasks.build_tokenizer()
    splits = tasks.make_prompts(settings.num_train_prompts, settings.num_held_out, seed=settings.seed,
                                min_len=settings.min_len, max_len=settings.max_len)
    model = demo.build_model(settings, tokenizer)
    log(f"[sweep] demo: SFT of a tiny Llama, {settings.sft_steps} steps")
    demo.sft(model, tokenizer, list(splits.train), settings)
    train_rows = tasks.make_preference_rows(splits.train[: settings.dpo_pairs], seed=settings.seed + 3)
    held_out_rows = tasks.make_preference_rows(splits.held_out, seed=settings.seed + 2)
    return DemoSetup(
        model=model.eval(), tokenizer=tokenizer, settings=settings,
        train_pairs=[tasks.tokenize_row(tokenizer, row, index=i) for i, row in enumerate(train_rows)],
        eval_pairs=[tasks.tokenize_row(tokenizer, row, index=i) for i, row in enumerate(held_out_rows)],
    )


def demo_config(settings, pairs: Sequence[TokenizedPair], output_dir: str, **overrides: Any):
    """The `DPOConfig` the demo trains with (`dpo_fast.demo.run.dpo`), with `overrides` on top."""
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    values: dict[str, Any] = dict(
        output_dir=output_dir, overwrite_output_dir=True, seed=settings.seed,
        learning_rate=settings.dpo_learning_rate, max_steps=settings.dpo_steps, warmup_ratio=0.1,
        lr_scheduler_type="cosine", beta=settings.beta, loss_type="sigmoid", layout="prefix_shared",
        max_length=longest, max_tokens_per_row=4 * longest,
        max_tokens_per_batch=settings.dpo_batch_size * 3 * longest // 2,
        logging_steps=max(1, settings.dpo_steps // 30), report_to_tensorboard=False,
        # A tiny model with memory to spare: recomputing its activations would only cost time.
        gradient_checkpointing=False,
    )
    values.update(overrides)
    return DPOConfig(**values)


def demo_prompts(*, limit: int | None = None) -> list[Any]:
    """The sorting task's DPO training prompts (`DemoSettings`' split), the first `limit` of them."""
    s = demo.DemoSettings()
    splits = tasks.make_prompts(s.num_train_prompts, s.num_held_out, seed=s.seed, min_len=s.min_len,
                                max_len=s.max_len)
    return first_prompts(list(splits.train[: s.dpo_pairs]), limit)


class TaskCodec(TextCodec):
    """The sorting task's encoding (`dpo_fast.demo.tasks`): BOS + prompt characters, completion characters + EOS."""

    def encode_prompt(self, prompt: str | list) -> list[int]:
        return tasks.encode_prompt(self.tokenizer, prompt)

    def encode_completion(self, prompt: str | list, completion: str) -> list[int]:
        return tasks.encode_completion(self.tokenizer, completion)
