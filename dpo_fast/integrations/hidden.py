"""Last hidden states through a model's own forward, so the lm_head can be fused into the loss."""

from __future__ import annotations

import functools
import types

import torch

HIDDEN_KWARG = "dpo_fast_hidden_states"


def add_hidden_state_forward(model) -> None:
    """Let `model(..., dpo_fast_hidden_states=True)` return the backbone's last hidden states.

    `model` is a transformers causal LM (the inner one under a PEFT wrapper). Going through `model(...)`
    rather than calling the backbone directly keeps DDP/FSDP wrappers and PEFT adapters in the loop.
    Idempotent; the ordinary forward (generation included) is untouched.
    """
    if getattr(model, "_dpo_fast_hidden_forward", False):
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} transforms its logits ({name}={getattr(config, name)}); the fused "
                "lm_head of dpo_fast scores plain `hidden @ lm_head.weight.T (+ bias)` logits only"
            )
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        if not kwargs.pop(HIDDEN_KWARG, False):
            return original_forward(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)
    model._dpo_fast_hidden_forward = True


def last_hidden_state(model, model_kwargs: dict) -> torch.Tensor:
    """[R, T, H] from a model prepared by `add_hidden_state_forward` (possibly wrapped by DDP or PEFT)."""
    return model(**model_kwargs, **{HIDDEN_KWARG: True})
