"""Backend dispatch for the token-level ops (one entry per op, one module per backend).

Backends are imported on first use, so `import dpo_fast` never imports Triton.
"""

from __future__ import annotations

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
    """[N, H] hidden, [V, H] weight -> [N] float32 log-probs of `hidden @ weight.T + bias`, tile by tile."""
    if backend == "triton":
        from . import triton_linear

        return triton_linear.linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    from . import torch_logps

    return torch_logps.linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index)


def linear_dpo_loss_one_pass(config, flat, weight, bias, ref_chosen_logps, ref_rejected_logps, *, backend: str):
    """The materialise-a-chunk schedule (6·N·H·V flops) where it applies and wins, else None.

    None sends the caller down the recompute schedule (token log-probs, then autograd).
    """
    from ..losses import PAIR_SEPARABLE

    if backend != "torch" or config.loss_type not in PAIR_SEPARABLE:
        return None
    from ..validation import check_ref
    from . import torch_one_pass

    b = flat.num_sequences // 2
    check_ref("ref_chosen_logps", ref_chosen_logps, b, flat.values.device)
    check_ref("ref_rejected_logps", ref_rejected_logps, b, flat.values.device)
    lengths = flat.lengths() if config.needs_lengths else None
    return torch_one_pass.linear_dpo_loss_one_pass(
        config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences, flat.ignore_index,
        ref_chosen_logps, ref_rejected_logps, lengths,
    )
