"""Backend dispatch for the token-level ops (one entry per op, one module per backend).

Backends are imported on first use, so `import dpo_fast` never imports Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, *, ignore_index: int, backend: str) -> Tensor:
    """[N, V] logits, [N] labels -> [N] float32 log-probs (0 where ignored), differentiable in the logits."""
    if backend == "triton":
        from . import triton_logps

        return triton_logps.token_logps(logits, labels, ignore_index=ignore_index)
    from . import torch_logps

    return torch_logps.token_logps(logits, labels, ignore_index=ignore_index)


def linear_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None, ignore_index: int,
                       backend: str) -> Tensor:
    """[N, H] hidden, [V, H] weight -> [N] float32 log-probs of `hidden @ weight.T + bias`, chunk by chunk
    (the two-pass schedule on triton, the recompute one on torch). Under torch.no_grad only the forward runs
    and nothing is kept for a backward."""
    if backend == "triton":
        from . import triton_linear

        return triton_linear.linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    from . import torch_logps

    return torch_logps.linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index)


def linear_loss_schedule_for(config, flat, weight, bias, *, backend: str) -> str:
    """`schedule.linear_loss_schedule` for this batch: measures the sizes it reads (one host sync, and only
    for pair-separable losses, the only ones whose schedule depends on them)."""
    from ..formulas import PAIR_SEPARABLE
    from . import schedule
    from .torch_one_pass import single_buffer_applies

    b = flat.num_sequences // 2
    pair_separable = config.loss_type in PAIR_SEPARABLE
    scored = largest = 0
    if pair_separable and b > 0:
        # flat holds scored tokens only when it comes from _FlatHidden; count them either way.
        seg = flat.segment_ids[flat.labels != flat.ignore_index]
        per_pair = torch.bincount(seg % b, minlength=b)
        scored, largest = (int(x) for x in torch.stack([per_pair.sum(), per_pair.max()]).tolist())
    one_dtype = weight.dtype == flat.values.dtype and (bias is None or bias.dtype == weight.dtype)
    return schedule.linear_loss_schedule(
        backend, pair_separable=pair_separable, one_buffer=single_buffer_applies(config),
        dtype=flat.values.dtype, one_dtype=one_dtype, num_pairs=b, scored_tokens=scored,
        largest_pair_tokens=largest, hidden_size=weight.shape[1], vocab_size=weight.shape[0])


def linear_dpo_loss_one_pass(config, flat, weight, bias, ref_chosen_logps, ref_rejected_logps, *, backend: str):
    """The one-pass schedule (6·N·H·V flops) where `schedule.linear_loss_schedule` picks it, else None.

    None sends the caller down the token-level schedule (`linear_token_logps`, then autograd).
    """
    from ..validation import check_ref
    from . import schedule

    chosen = linear_loss_schedule_for(config, flat, weight, bias, backend=backend)
    if chosen not in (schedule.TRITON_ONE_PASS, schedule.TORCH_ONE_PASS):
        return None
    b = flat.num_sequences // 2
    check_ref("ref_chosen_logps", ref_chosen_logps, b, flat.values.device)
    check_ref("ref_rejected_logps", ref_rejected_logps, b, flat.values.device)
    lengths = flat.lengths() if config.needs_lengths else None
    args = (config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences, flat.ignore_index,
            ref_chosen_logps, ref_rejected_logps, lengths)
    if chosen == schedule.TRITON_ONE_PASS:
        from . import triton_one_pass

        return triton_one_pass.linear_dpo_loss_pair_chunks(*args)
    from . import torch_one_pass

    return torch_one_pass.linear_dpo_loss_one_pass(*args)
