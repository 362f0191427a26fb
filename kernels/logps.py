"""Token log-probs from materialised logits: `log_softmax(logits)[n, labels[n]]` and its gradient.

Both kernels are memory-bound streams over an [N, V] buffer (the logits of `fused_dpo_loss`, or a chunk
of logits that cuBLAS just wrote in the linear schedules), so they are built for bandwidth:

- One program per token row, looping over the vocabulary in BLOCK_V tiles. At the benchmark shape
  (16384 rows) that is dozens of waves of programs, so a persistent grid would only save block
  launches (microseconds); rows of a 32k-256k vocabulary are long enough to fill a program alone.
- One read per pass: an online log-sum-exp (running max and sum, one exp per element) in the forward,
  a pure read-exp-write stream in the backward.
- The next tile is loaded before the current one is reduced (manual double buffering): while a program
  waits on a tile's reductions, the next tile's loads are already in flight.
- Bytes in flight per SM are what a memory-bound kernel lives on, and registers bound them. ptxas for
  sm_90 (offline, Triton 3.9) at the 16 KB tile over 8 warps: 64 registers per thread in both kernels
  for bf16/fp16 (56 for fp32), so 4 programs (32 warps) fit on an SM with a 16 KB tile each, 64 KB of
  loads in flight before the prefetch. Keeping the sum of exponentials per lane instead (one cross-warp
  reduction per tile instead of two) took 107 registers in the forward: 2 programs per SM, half the
  bytes in flight, so the forward keeps both reductions and lets the other programs cover the barriers.
- Streaming loads are `evict_first`: a row is read once per pass and the buffer (hundreds of MB) is far
  larger than L2, so keeping it there would only evict the small vectors.
- The launcher (`dpo_fast/loss/ops/triton_logps.py`) picks BLOCK_V and num_warps so each thread holds four
  128-bit vectors per tile. Loads and stores are 128-bit only when Triton sees V and the row stride
  divisible by 16 (true of the usual vocabularies, 32000/128256/151936/262144; the sm_90 PTX is checked
  by tests/test_triton_logps.py); a ragged vocabulary (50257, 32003) falls back to narrower accesses,
  since its rows are not 16-byte aligned anyway.

The backward writes `g * (onehot - softmax)` straight into the gradient in the logits' dtype (no float32
copy of [N, V]); DLogits may be Logits itself (the in-place gradient of the linear schedules): each tile
is read before it is written, and a prefetched tile is never one written before.

Rows whose label is the ignore index are not scored: the forward writes 0 without reading the row,
the backward writes a zero row without reading the logits.
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
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_first")
    nxt = tl.load(row_ptr + BLOCK_V + cols, mask=BLOCK_V + cols < V, other=float("-inf"),
                  eviction_policy="evict_first")
    x = x.to(tl.float32)
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    for start in range(BLOCK_V, V, BLOCK_V):
        x = nxt.to(tl.float32)
        # Issued before this tile's reductions: its latency overlaps their barriers. Past V it is fully
        # masked and moves no bytes.
        offs = start + BLOCK_V + cols
        nxt = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"), eviction_policy="evict_first")
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
    DLogits,  # [N, V] out, dtype of Logits, contiguous (may be Logits): grad * (onehot(label) - softmax)
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
    # No reduction here, so warps stream independently; the next tile is still loaded before this one
    # is stored, for two tiles of loads in flight per program.
    nxt = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_first")
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = nxt.to(tl.float32)
        ahead = offs + BLOCK_V
        nxt = tl.load(row_ptr + ahead, mask=ahead < V, other=float("-inf"), eviction_policy="evict_first")
        d = -g * tl.exp(x - lse)
        d = tl.where(offs == label, d + g, d)
        tl.store(out_ptr + offs, d.to(DLogits.dtype.element_ty), mask=mask)
