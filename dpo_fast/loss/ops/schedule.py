"""Which schedule computes `linear_dpo_loss`: one pure function of the backend, loss, dtype and sizes.

Four schedules, two per backend:

    backend  schedule     flops     runs when
    triton   one-pass     6·N·H·V   a pair-separable loss, bf16/fp32 in one dtype, every pair's logits
                                    within LOGITS_BUDGET_BYTES (`triton_one_pass`)
    triton   two-pass     8·N·H·V   everything else: batch-coupled losses, fp16, mixed dtypes, a pair
                                    longer than the budget (split into token chunks) (`triton_linear`)
    torch    one-pass     6·N·H·V   a pair-separable loss with enough scored tokens per pair
                                    (`torch_one_pass`)
    torch    recompute    8·N·H·V   everything else (`torch_logps.TorchLinearTokenLogps`)

The triton schedules put every product in cuBLAS and the softmax in Triton. Measured on one H200
(../shared/gpu/h200-2026-11-29.md: bf16, 16384 tokens, H=4096, V=128256, commit 9531940): the one-pass
schedule took 76.7 ms, 1.01x the 6·N·H·V roofline and 0.84x Liger's time (with the logits-in kernels of
that commit; the rewritten ones are not yet timed); the tl.dot kernels it replaces
took 313-1301 ms. The two-pass schedule does a third more flops by design (the backward recomputes the
logits because a batch-coupled loss's per-token coefficient is known only once every pair is seen).

Nothing here touches a tensor: the caller measures the sizes (one host sync for the scored-token counts,
and only for pair-separable losses, the only ones whose choice depends on them).
"""

from __future__ import annotations

import torch

TRITON_ONE_PASS = "triton one-pass"
TRITON_TWO_PASS = "triton two-pass"
TORCH_ONE_PASS = "torch one-pass"
TORCH_RECOMPUTE = "torch recompute"

# Bytes of the logits buffer of both triton schedules (whole pairs for one-pass, token chunks for two-pass):
# one pair of 2 x 1024 tokens at Llama-3's 128256 vocabulary in bf16 is 525 MB. A 2048 x 4096 x 128256
# product already keeps cuBLAS at its full rate (the one-pass schedule measured 1.01x the roofline at this
# budget on an H200), so a larger buffer would add memory, not speed.
LOGITS_BUDGET_BYTES = 2**29

# dtypes of the triton one-pass schedule. fp16 goes to the two-pass schedule: the one-pass one sums dweight
# in the input dtype, and fp16's range (65504) does not hold a sum of D^T h over many tokens.
TRITON_ONE_PASS_DTYPES = (torch.bfloat16, torch.float32)

# The torch one-pass schedule's threshold, measured on the shared 2-core Xeon (AVX-512), 1 thread, fp32,
# H=512, V=32000, sigmoid loss, 4096 tokens in all unless fewer pairs fit; process CPU seconds for forward
# + backward, median of 3 interleaved runs (`benchmarks/bench_loss.py` has the full comparison):
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
TORCH_MIN_TOKENS_PER_PAIR = {"one buffer": 64, "two buffers": 128}


def linear_loss_schedule(backend: str, *, pair_separable: bool, one_buffer: bool, dtype: torch.dtype,
                         one_dtype: bool, num_pairs: int, scored_tokens: int, largest_pair_tokens: int,
                         hidden_size: int, vocab_size: int) -> str:
    """The schedule for one call of `linear_dpo_loss`.

    Args:
        backend: "triton" or "torch" (already resolved from "auto").
        pair_separable: the loss of a pair depends on that pair alone (`losses.PAIR_SEPARABLE`).
        one_buffer: the torch one-pass schedule needs a single [V, H] scratch buffer
            (`torch_one_pass.single_buffer_applies`).
        dtype: the hidden states' dtype; one_dtype: weight and bias (if any) share it.
        num_pairs, scored_tokens, largest_pair_tokens: the batch's pairs, scored tokens, and the scored
            tokens of its largest pair (chosen + rejected). Only read for pair-separable losses.
        hidden_size, vocab_size: H and V of the head.
    """
    if backend == "triton":
        fits = largest_pair_tokens * vocab_size * dtype.itemsize <= LOGITS_BUDGET_BYTES
        if pair_separable and one_dtype and dtype in TRITON_ONE_PASS_DTYPES and fits:
            return TRITON_ONE_PASS
        return TRITON_TWO_PASS
    if backend != "torch":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if not pair_separable:
        return TORCH_RECOMPUTE
    min_tokens = TORCH_MIN_TOKENS_PER_PAIR["one buffer" if one_buffer else "two buffers"]
    if scored_tokens < min_tokens * num_pairs or scored_tokens < hidden_size:
        return TORCH_RECOMPUTE
    return TORCH_ONE_PASS
