"""The reference model of a run, in one of four forms, each fixed before any weight changes:

- none: a reference-free loss (simpo, ...) compares nothing;
- a frozen model: the `ref_model` given, or a frozen copy of the initial policy;
- the policy with its LoRA adapter disabled (no copy: the base weights are the initial policy);
- reference log-probs precomputed once per pair (`precompute_ref`), cached on disk under a key of the
  weights, the pairs and the settings that change them, and gathered per micro-batch on the device.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..data.pairs import TokenizedPair, pairs_fingerprint
from .config import DPOConfig
from .scoring import is_peft_model, model_base, pair_logps

logger = logging.getLogger(__name__)

# Part of the cache key: bump it when the cached values would change for the same weights and pairs.
REF_CACHE_VERSION = 1


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode, no parameter requiring a gradient; returns the model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(policy: nn.Module) -> nn.Module:
    """A frozen copy of the policy as it is now; the reference keeps no activations to recompute."""
    ref_model = freeze(copy.deepcopy(policy))
    if hasattr(ref_model, "activation_checkpointing_disable"):  # transformers >= 5 (the old name warns)
        ref_model.activation_checkpointing_disable()
    elif hasattr(ref_model, "gradient_checkpointing_disable"):
        ref_model.gradient_checkpointing_disable()
    return ref_model


def reference_model(config: DPOConfig, policy: nn.Module, ref_model: nn.Module | None) -> nn.Module | None:
    """The model a run's reference forward passes go through: the given one, else a frozen copy of the
    policy; None for a reference-free loss and under LoRA (the policy with its adapter disabled)."""
    if config.reference_free:
        return None
    if ref_model is None and not is_peft_model(policy):
        return frozen_copy(policy)
    return ref_model


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap content hash of a model's weights: names, shapes, dtypes, float64 sums and a strided sample.

    Hashing every byte of a 7B model would take a minute; a sum plus 4096 sampled values per tensor
    changes with any training step or different checkpoint, which is what the cache key needs.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if not t.is_floating_point() or t.numel() == 0:
                h.update(t.detach().cpu().contiguous().view(-1)[:4096].numpy().tobytes() if t.numel() else b"")
                continue
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // 4096)
            h.update(flat[::stride].float().cpu().numpy().tobytes())
            # float64 sum chunk by chunk: a float64 copy of a whole embedding matrix would be gigabytes.
            total = sum(float(chunk.double().sum()) for chunk in flat.split(1 << 22))
            h.update(repr(total).encode())
    return h.hexdigest()


def cache_path(config: DPOConfig, model: nn.Module, pairs: Sequence[TokenizedPair], *, layout: str,
               bf16: bool, adapter_disabled: bool) -> str:
    """Where the reference log-probs of `pairs` under `model` are cached: a key of the weights, the pairs and
    every setting that changes the values (bf16: autocast in use, on CUDA only; adapter_disabled: the policy
    has a LoRA adapter)."""
    key = hashlib.sha256()
    settings = {"version": REF_CACHE_VERSION, "max_length": config.max_length, "truncation": config.truncation,
                "layout": layout, "bf16": bf16, "adapter_disabled": adapter_disabled}
    key.update(json.dumps(settings, sort_keys=True).encode())
    key.update(weights_fingerprint(model).encode())
    key.update(pairs_fingerprint(pairs).encode())
    directory = config.ref_cache_dir or os.path.join(config.output_dir, "ref_cache")
    return os.path.join(directory, f"ref_logps-{key.hexdigest()[:32]}.pt")


def read_cache(path: str, num_pairs: int) -> Tensor | None:
    """The cached [num_pairs, 2] log-probs at `path`, or None (absent, or for another number of pairs)."""
    if not os.path.isfile(path):
        return None
    cached = torch.load(path, weights_only=True)
    return cached if tuple(cached.shape) == (num_pairs, 2) else None


def reference_pair_logps(model: nn.Module, tokenizer, pairs: Sequence[TokenizedPair], *, layout: str,
                         max_length: int, max_tokens_per_batch: int, backend: str) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed log-probs of `pairs` under the reference `model` (a peft model with its
    adapter disabled), without gradients; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
    with adapter_off, torch.no_grad():
        chosen, rejected = pair_logps(model_base(model), tokenizer, list(pairs), layout=layout,
                                      max_length=max_length, max_tokens_per_batch=max_tokens_per_batch,
                                      backend=backend)
    model.train(was_training)
    return chosen, rejected


def gather_cached(cache: Tensor, member_index: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """A micro-batch's (chosen, rejected) reference log-probs from the device-resident cache."""
    values = cache.index_select(0, member_index.to(device, non_blocking=True))
    return values[:, 0], values[:, 1]


def forward_reference_logps(sums_of: Callable[..., Tensor], inputs: dict, *, policy: nn.Module | None = None
                            ) -> tuple[Tensor, Tensor]:
    """A micro-batch's (chosen, rejected) reference log-probs by a forward pass without gradients: through
    the reference model's outputs, or (policy given: LoRA) the policy's with its adapter disabled."""
    with torch.no_grad():
        if policy is None:
            sums = sums_of(**inputs, reference=True)
        else:
            was_training = policy.training
            policy.eval()
            with policy.disable_adapter():
                sums = sums_of(**inputs, reference=True)
            policy.train(was_training)
    b = inputs["num_pairs"]
    return sums[:b], sums[b:]
