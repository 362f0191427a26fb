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


# When the one-pass schedule wins (measured on the 2-core CPU, 1 thread, fp32, H=512, V=32000, sigmoid;
# CPU seconds for forward + backward, median of 3; `benchmarks/bench_loss.py` has the full comparison):
#   scored tokens per pair   naive   recompute   one-pass (1 buffer)   one-pass (2 buffers)
#   1024 (4 pairs x 2x512)    4.13     4.90          3.49                  3.61
#    128 (16 pairs x 2x64)    1.94     2.35          2.16                  2.32
#     64 (32 pairs x 2x32)    1.91     2.30          2.43                  2.68
#     16 (64 pairs x 2x8)     0.99     1.18          3.08                  3.71
# The one-pass schedule saves a quarter of the matmul flops but pays, per pair, a few passes over its
# [V, H] scratch buffer (fold into dweight), so it needs enough tokens per pair to amortise them.
# Its scratch buffer also costs V*H*4 bytes more than the recompute schedule: with fewer tokens than
# the hidden size that is more than the logits it avoids recomputing.
ONE_PASS_MIN_TOKENS_PER_PAIR = 96


def linear_dpo_loss_one_pass(config, flat, weight, bias, ref_chosen_logps, ref_rejected_logps, *, backend: str):
    """The materialise-a-chunk schedule (6·N·H·V flops) where it applies and wins, else None.

    None sends the caller down the recompute schedule (token log-probs, then autograd).
    """
    from ..losses import PAIR_SEPARABLE

    if backend != "torch" or config.loss_type not in PAIR_SEPARABLE:
        return None
    b = flat.num_sequences // 2
    scored = int((flat.labels != flat.ignore_index).sum())
    if scored < ONE_PASS_MIN_TOKENS_PER_PAIR * b or scored < weight.shape[1]:
        return None
    from ..validation import check_ref
    from . import torch_one_pass

    check_ref("ref_chosen_logps", ref_chosen_logps, b, flat.values.device)
    check_ref("ref_rejected_logps", ref_rejected_logps, b, flat.values.device)
    lengths = flat.lengths() if config.needs_lengths else None
    return torch_one_pass.linear_dpo_loss_one_pass(
        config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences, flat.ignore_index,
        ref_chosen_logps, ref_rejected_logps, lengths,
    )
