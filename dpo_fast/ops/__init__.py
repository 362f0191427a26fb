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

    if backend not in ("torch", "triton") or config.loss_type not in PAIR_SEPARABLE:
        return None
    from ..validation import check_ref

    b = flat.num_sequences // 2
    if backend == "triton":
        # Whole pairs' logits through cuBLAS (6·N·H·V flops, all in cuBLAS) where enabled, a pair's logits
        # fit its budget and the dtype is bf16/fp32; else the tile-bounded fused-linear kernels. Opt-in
        # until timed on a GPU (benchmarks/bench_loss.py compares both on CUDA).
        from . import triton_one_pass

        if not triton_one_pass.ENABLED or not triton_one_pass.applies(
                config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences,
                flat.ignore_index):
            return None
        check_ref("ref_chosen_logps", ref_chosen_logps, b, flat.values.device)
        check_ref("ref_rejected_logps", ref_rejected_logps, b, flat.values.device)
        return triton_one_pass.linear_dpo_loss_pair_chunks(
            config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences,
            flat.ignore_index, ref_chosen_logps, ref_rejected_logps,
            flat.lengths() if config.needs_lengths else None,
        )
    from . import torch_one_pass

    # When the one-pass schedule wins. Measured on the shared 2-core Xeon (AVX-512), 1 thread, fp32, H=512,
    # V=32000, sigmoid loss, 4096 tokens in all unless fewer pairs fit; process CPU seconds for forward +
    # backward, median of 3 interleaved runs (`benchmarks/bench_loss.py` has the full comparison):
    #   scored tokens per pair   naive   recompute   one-pass (1 buffer)   one-pass (2 buffers)
    #   1024 (4 pairs)            3.72     4.51          3.12                  3.23
    #    128 (16 pairs)           1.82     2.34          1.93                  2.10
    #     96 (21 pairs)           1.88     2.31          2.12                  2.28
    #     64 (32 pairs)           1.89     2.38          2.21                  2.46
    #     16 (64 pairs)           0.95     1.16          2.67                  3.65
    # The one-pass schedule saves a quarter of the matmul flops but pays, per pair, a few passes over its
    # [V, H] scratch buffer(s) (the fold into dweight), so it needs enough tokens per pair to amortise them:
    # 64 with one buffer; with two, 96 is a tie, so 128. And with fewer scored tokens than the hidden
    # size, its [V, H] float32 scratch would be larger than the full [N, V] logits it exists to avoid.
    scored = int((flat.labels != flat.ignore_index).sum())
    if scored < torch_one_pass.min_tokens_per_pair(config) * b or scored < weight.shape[1]:
        return None

    check_ref("ref_chosen_logps", ref_chosen_logps, b, flat.values.device)
    check_ref("ref_rejected_logps", ref_rejected_logps, b, flat.values.device)
    lengths = flat.lengths() if config.needs_lengths else None
    return torch_one_pass.linear_dpo_loss_one_pass(
        config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences, flat.ignore_index,
        ref_chosen_logps, ref_rejected_logps, lengths,
    )
