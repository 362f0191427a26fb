"""Token log-probs from materialised logits: `log_softmax(logits)[n, labels[n]]` and its gradient.

One program per token row. The forward streams the row once in vocab tiles, keeping a running max
and a running sum of exponentials in float32 (online log-sum-exp), so a row of any length costs one
read and no scratch memory. The backward streams it again and writes `g * (onehot - softmax)`
straight into the gradient in the logits' dtype: no float32 copy of `[N, V]` ever exists.

Rows whose label is the ignore index are not scored: the forward writes 0 without reading the row,
the backward writes a zero row without reading the logits.

The launcher (`dpo_fast/ops/triton_logps.py`) guarantees unit stride along the vocabulary. Loads and
stores are 128-bit only when Triton sees V and the row stride divisible by 16 (true of the usual
vocabularies, 32000/128256/151936/262144; checked in the sm_90 PTX); a ragged vocabulary (50257, 32003)
falls back to 16-bit accesses, since its rows are not 16-byte aligned anyway.
"""

import triton
import triton.language as tl


@triton.jit
def _token_logps_fwd(
    Logits,  # [N, V] logits (fp32/bf16/fp16/fp64), unit stride along V
    Labels,  # [N] int64 target ids; IGNORE where the token is not scored
    Logps,  # [N] float32 out: log_softmax(logits)[n, label], 0 where ignored, NaN for an out-of-range label
    Lse,  # [N] float32 out: per-row log-sum-exp, kept for the backward (0 where ignored)
    stride_row,  # elements between consecutive rows of Logits
    V,  # vocabulary size (columns of Logits)
    ignore_index,  # label value that marks a token as not scored
    BLOCK_V: tl.constexpr,  # vocab tile width, a power of two
):
    # int64 row offset: row * stride passes 2^31 for long batches at a 256k vocabulary.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(Labels + row)
    if label == ignore_index:
        tl.store(Logps + row, 0.0)
        tl.store(Lse + row, 0.0)
        return
    row_ptr = Logits + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    # The first tile is peeled so the running max starts finite (no -inf - -inf = NaN on the rescale)
    # and both loop-carried values start as float32 scalars.
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    for start in range(BLOCK_V, V, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # One exp per element: the old sum is rescaled once per tile, not per element.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    # An out-of-range label is never read (it would be out of bounds): its log-prob is NaN, which
    # poisons the loss visibly instead of silently scoring a wrong token.
    in_range = (label >= 0) & (label < V)
    target = tl.load(row_ptr + label, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(Logps + row, target - lse)
    tl.store(Lse + row, lse)


@triton.jit
def _token_logps_bwd(
    Logits,  # [N, V] logits of the forward, unit stride along V
    Labels,  # [N] int64 target ids; IGNORE where the token is not scored
    Lse,  # [N] float32 per-row log-sum-exp saved by the forward
    Grad,  # [N] float32 (or any float) upstream gradient of the token log-probs, contiguous
    DLogits,  # [N, V] out, dtype of Logits, contiguous: grad[n] * (onehot(label) - softmax(logits[n]))
    stride_row,  # elements between consecutive rows of Logits
    V,  # vocabulary size
    ignore_index,  # label value that marks a token as not scored
    BLOCK_V: tl.constexpr,  # vocab tile width, a power of two
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(Labels + row)
    out_ptr = DLogits + row * V
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        # Not scored: a zero gradient row, without touching the logits.
        zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(DLogits.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(out_ptr + offs, zeros, mask=offs < V)
        return
    row_ptr = Logits + row * stride_row
    g = tl.load(Grad + row).to(tl.float32)
    lse = tl.load(Lse + row)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        d = -g * tl.exp(x - lse)
        d = tl.where(offs == label, d + g, d)
        tl.store(out_ptr + offs, d.to(DLogits.dtype.element_ty), mask=mask)
