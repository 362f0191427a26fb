"""Token log-probs of `hidden @ weight.T + bias` without materialising the [N, V] logits.

Recompute schedule. Every kernel rebuilds the logits one [BLOCK_N, BLOCK_V] tile at a time
(`tl.dot` over H in BLOCK_H steps, float32 accumulation) and throws the tile away after use, so the
transient memory is one tile per program whatever N and V are.

- `_linear_logps_fwd`: programs over (token tile, vocab split). Each keeps an online log-sum-exp
  (running max and rescaled sum of exponentials) of its share of the vocabulary, and picks the target
  logit when the label falls in that share. The launcher merges the splits (a few [N] vectors).
- `_linear_logps_bwd_hidden`: programs over (token tile, vocab split). For each vocab tile,
  `coef = onehot - softmax` and `dhidden[rows] += g * (coef @ weight[tile])`, added H chunk by H chunk
  into a float32 buffer (atomically: vocab splits of one token tile add into the same rows).
- `_linear_logps_bwd_weight`: one program per vocab tile, looping over the token tiles:
  `dweight[tile] += (g * coef)^T @ hidden[rows]` into a float32 buffer the program owns, and
  `dbias[tile] = column sums of g * coef`.

Token tiles whose upstream gradient is all zero (padding, prompts) are skipped in both backward
kernels.

Second backward schedule ("chunked"): `_linear_logps_bwd_dlogits` writes `g * (onehot - softmax)`
for a chunk of tokens into a [chunk, V] buffer in the input dtype (one program per tile, no loop but
H), and the launcher hands the two products to cuBLAS: 2·N·H·V backward flops in tl.dot instead of
8·N·H·V, plus 4·N·H·V in cuBLAS, for a [chunk, V] buffer instead of one tile.

The launcher (`dpo_fast/ops/triton_linear.py`) guarantees unit stride along H, contiguous output
buffers, and `Grad` already zeroed where the label is ignored.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST_DOT works around Triton's interpreter, whose tl.dot multiplies the raw bits of bfloat16
    operands (it stores them as uint16): the operands are widened to float32 first, which gives the
    same products as the tensor cores, since every bfloat16 value is exact in float32.
    """
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """x (float32) rounded to nearest in DTYPE, the dtype of the tensor-core dot.

    Under UPCAST_DOT the value stays float32 but is rounded to bfloat16 by hand (round half to even
    on the bit pattern): the interpreter's own float32 -> bfloat16 cast truncates, which biases every
    term of a sum the same way, unlike the GPU's conversion.
    """
    if UPCAST_DOT:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _logits_tile(
    Hidden,  # [N, H] activations, unit stride along H
    Weight,  # [V, H] lm_head weight (dtype of Hidden), unit stride along H
    Bias,  # [V] bias; not read when HAS_BIAS is False
    rows,  # [BLOCK_N] int64 token indices of the tile
    cols,  # [BLOCK_V] int64 vocab indices of the tile
    row_mask,  # [BLOCK_N] rows < N
    col_mask,  # [BLOCK_V] cols < V
    hidden_size,  # H
    stride_hidden,  # elements between consecutive rows of Hidden
    stride_weight,  # elements between consecutive rows of Weight
    HAS_BIAS: tl.constexpr,  # add Bias to every row
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs ("ieee" or "tf32"); None for 16-bit
    UPCAST_DOT: tl.constexpr,  # widen the dot operands to float32 (interpreter with bfloat16, see _dot)
    BLOCK_N: tl.constexpr,  # tokens per tile (>= 16 for tl.dot)
    BLOCK_V: tl.constexpr,  # vocab entries per tile (>= 16)
    BLOCK_H: tl.constexpr,  # hidden features per tl.dot step (>= 16)
):
    """The float32 logits tile; columns past V are -inf, so they vanish from max, sum and softmax."""
    offs_h = tl.arange(0, BLOCK_H)
    hidden_rows = Hidden + rows[:, None] * stride_hidden
    weight_rows = Weight + cols[:, None] * stride_weight
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_H):
        ks = k + offs_h
        k_mask = ks < hidden_size
        h = tl.load(hidden_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, INPUT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def _linear_logps_fwd(
    Hidden,  # [N, H] activations (fp32/bf16/fp16), unit stride along H
    Weight,  # [V, H] lm_head weight, same dtype, unit stride along H
    Bias,  # [V] bias; not read when HAS_BIAS is False
    Labels,  # [N] int64 target ids (any value outside [0, V) picks no logit)
    PartMax,  # [SPLITS, N] float32 out: max logit of the program's vocab share, per token
    PartSum,  # [SPLITS, N] float32 out: sum of exp(logit - PartMax) over that share
    PartTarget,  # [SPLITS, N] float32 out: the label's logit if it lies in that share, else 0
    n_tokens,  # N
    vocab,  # V
    hidden_size,  # H
    stride_hidden,  # elements between consecutive rows of Hidden
    stride_weight,  # elements between consecutive rows of Weight
    tiles_per_split,  # vocab tiles per program along grid axis 1 (the last split may have fewer)
    HAS_BIAS: tl.constexpr,  # add Bias to the logits
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    UPCAST_DOT: tl.constexpr,  # widen the dot operands to float32 (interpreter with bfloat16, see _dot)
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_V: tl.constexpr,  # vocab entries per tile
    BLOCK_H: tl.constexpr,  # hidden features per tl.dot step
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    # int64 offsets: row * stride passes 2^31 at N*H or V*H beyond 2 G elements (128k vocab x 16k H).
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    labels = tl.load(Labels + rows, mask=row_mask, other=-1)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split.to(tl.int64) * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
    for v in range(v_begin, v_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab
        logits = _logits_tile(Hidden, Weight, Bias, rows, cols, row_mask, col_mask, hidden_size, stride_hidden,
                              stride_weight, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        # Every tile holds at least one real column, so m_new is finite and the rescale never sees
        # -inf - -inf; the first tile's rescale factor is exp(-inf) = 0 times s = 0.
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    out = split.to(tl.int64) * n_tokens + rows
    tl.store(PartMax + out, m, mask=row_mask)
    tl.store(PartSum + out, s, mask=row_mask)
    tl.store(PartTarget + out, target, mask=row_mask)


@triton.jit
def _linear_logps_bwd_hidden(
    Hidden,  # [N, H] activations of the forward, unit stride along H
    Weight,  # [V, H] lm_head weight, unit stride along H
    Bias,  # [V] bias; not read when HAS_BIAS is False
    Labels,  # [N] int64 target ids
    Lse,  # [N] float32 log-sum-exp of each token's logits, from the forward
    Grad,  # [N] float32 upstream gradient, 0 where the label is ignored
    GradHidden,  # [N, H] float32, contiguous, zero-initialised: receives g * (onehot - softmax) @ Weight
    n_tokens,  # N
    vocab,  # V
    hidden_size,  # H
    stride_hidden,  # elements between consecutive rows of Hidden
    stride_weight,  # elements between consecutive rows of Weight
    tiles_per_split,  # vocab tiles per program along grid axis 1
    HAS_BIAS: tl.constexpr,  # add Bias to the logits
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    UPCAST_DOT: tl.constexpr,  # widen the dot operands to float32 (interpreter with bfloat16, see _dot)
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_V: tl.constexpr,  # vocab entries per tile
    BLOCK_H: tl.constexpr,  # hidden features per tl.dot step and per update of GradHidden
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    g = tl.load(Grad + rows, mask=row_mask, other=0.0)
    # Tiles of padding or prompt tokens (all g == 0) cost nothing: GradHidden is already zero.
    if tl.max(tl.abs(g), axis=0) > 0:
        labels = tl.load(Labels + rows, mask=row_mask, other=-1)
        lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
        scored = g != 0
        offs_h = tl.arange(0, BLOCK_H)
        v_begin = split.to(tl.int64) * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
        for v in range(v_begin, v_end, BLOCK_V):
            cols = v + tl.arange(0, BLOCK_V)
            col_mask = cols < vocab
            logits = _logits_tile(Hidden, Weight, Bias, rows, cols, row_mask, col_mask, hidden_size,
                                  stride_hidden, stride_weight, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT, BLOCK_N,
                                  BLOCK_V, BLOCK_H)
            probs = tl.exp(logits - lse[:, None])
            coef = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - probs
            # Rows not scored contribute exactly 0 (even if their logits overflow or hold NaN).
            coef = tl.where(scored[:, None], coef, 0.0)
            # coef is in [-1, 1] whatever g is: rounded to the 16-bit input dtype for the tensor-core
            # dot it cannot underflow as g * coef could in fp16; g is applied in float32 afterwards.
            coef = _dot_operand(coef, Weight.dtype.element_ty, UPCAST_DOT)
            weight_rows = Weight + cols[:, None] * stride_weight
            for k in range(0, hidden_size, BLOCK_H):
                ks = k + offs_h
                k_mask = ks < hidden_size
                w = tl.load(weight_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                part = _dot(coef, w, tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32), INPUT_PRECISION,
                            UPCAST_DOT) * g[:, None]
                # Relaxed atomics: with one split the program is the rows' only writer and its adds
                # stay in program order (deterministic); several splits trade that for parallelism.
                tl.atomic_add(GradHidden + rows[:, None] * hidden_size + ks[None, :], part,
                              mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def _linear_logps_bwd_weight(
    Hidden,  # [N, H] activations of the forward, unit stride along H
    Weight,  # [V, H] lm_head weight, unit stride along H
    Bias,  # [V] bias; not read when HAS_BIAS is False
    Labels,  # [N] int64 target ids
    Lse,  # [N] float32 log-sum-exp of each token's logits, from the forward
    Grad,  # [N] float32 upstream gradient, 0 where the label is ignored
    GradWeight,  # [V, H] float32, contiguous, zero-initialised: receives (g * coef)^T @ Hidden
    GradBias,  # [V] float32 out: column sums of g * coef; not written when COMPUTE_BIAS is False
    n_tokens,  # N
    vocab,  # V
    hidden_size,  # H
    stride_hidden,  # elements between consecutive rows of Hidden
    stride_weight,  # elements between consecutive rows of Weight
    HAS_BIAS: tl.constexpr,  # add Bias to the logits
    COMPUTE_WEIGHT: tl.constexpr,  # accumulate GradWeight
    COMPUTE_BIAS: tl.constexpr,  # write GradBias
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    UPCAST_DOT: tl.constexpr,  # widen the dot operands to float32 (interpreter with bfloat16, see _dot)
    BLOCK_N: tl.constexpr,  # tokens per loop step
    BLOCK_V: tl.constexpr,  # vocab entries per program
    BLOCK_H: tl.constexpr,  # hidden features per tl.dot step and per update of GradWeight
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab
    offs_h = tl.arange(0, BLOCK_H)
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n in range(0, n_tokens, BLOCK_N):
        rows = n + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < n_tokens
        g = tl.load(Grad + rows, mask=row_mask, other=0.0)
        scale = tl.max(tl.abs(g), axis=0)
        if scale > 0:
            labels = tl.load(Labels + rows, mask=row_mask, other=-1)
            lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
            logits = _logits_tile(Hidden, Weight, Bias, rows, cols, row_mask, col_mask, hidden_size,
                                  stride_hidden, stride_weight, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT, BLOCK_N,
                                  BLOCK_V, BLOCK_H)
            probs = tl.exp(logits - lse[:, None])
            coef = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - probs
            coef = tl.where((g != 0)[:, None], coef * g[:, None], 0.0)
            grad_bias += tl.sum(coef, axis=0)
            if COMPUTE_WEIGHT:
                # The token axis is the reduction here, so g cannot be factored out per row; the tile
                # is divided by its largest |g| instead, keeping it in [-1, 1] for the 16-bit dot.
                coef_t = tl.trans(_dot_operand(coef / scale, Hidden.dtype.element_ty, UPCAST_DOT))
                hidden_rows = Hidden + rows[:, None] * stride_hidden
                for k in range(0, hidden_size, BLOCK_H):
                    ks = k + offs_h
                    k_mask = ks < hidden_size
                    h = tl.load(hidden_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    part = _dot(coef_t, h, tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32), INPUT_PRECISION,
                                UPCAST_DOT) * scale
                    # This program is the only writer of these rows of GradWeight: a plain
                    # read-add-write, deterministic.
                    ptrs = GradWeight + cols[:, None] * hidden_size + ks[None, :]
                    mask = col_mask[:, None] & k_mask[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + part, mask=mask)
    if COMPUTE_BIAS:
        tl.store(GradBias + cols, grad_bias, mask=col_mask)


@triton.jit
def _linear_logps_bwd_dlogits(
    Hidden,  # [C, H] activations of a chunk of tokens, unit stride along H
    Weight,  # [V, H] lm_head weight, unit stride along H
    Bias,  # [V] bias; not read when HAS_BIAS is False
    Labels,  # [C] int64 target ids
    Lse,  # [C] float32 log-sum-exp of each token's logits, from the forward
    Grad,  # [C] float32 upstream gradient, 0 where the label is ignored
    GradScale,  # [1] float32, a power of two >= the chunk's largest |g|: the output is divided by it
    DLogits,  # [C, V] out, dtype of Hidden, contiguous: g * (onehot - softmax) / GradScale
    n_tokens,  # C
    vocab,  # V
    hidden_size,  # H
    stride_hidden,  # elements between consecutive rows of Hidden
    stride_weight,  # elements between consecutive rows of Weight
    HAS_BIAS: tl.constexpr,  # add Bias to the logits
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    UPCAST_DOT: tl.constexpr,  # widen the dot operands to float32 (interpreter with bfloat16, see _dot)
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_V: tl.constexpr,  # vocab entries per program
    BLOCK_H: tl.constexpr,  # hidden features per tl.dot step
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_tokens
    col_mask = cols < vocab
    # Dividing by a power of two is exact and keeps |output| <= 1: no fp16 underflow of a small g.
    g = tl.load(Grad + rows, mask=row_mask, other=0.0) / tl.load(GradScale)
    out = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if tl.max(tl.abs(g), axis=0) > 0:
        labels = tl.load(Labels + rows, mask=row_mask, other=-1)
        lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
        logits = _logits_tile(Hidden, Weight, Bias, rows, cols, row_mask, col_mask, hidden_size, stride_hidden,
                              stride_weight, HAS_BIAS, INPUT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        coef = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - tl.exp(logits - lse[:, None])
        out = tl.where((g != 0)[:, None], coef * g[:, None], 0.0)
    # Rounded to nearest first: the interpreter's own bfloat16 cast truncates (see _dot_operand).
    out = _dot_operand(out, DLogits.dtype.element_ty, UPCAST_DOT).to(DLogits.dtype.element_ty)
    tl.store(DLogits + rows[:, None] * vocab + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])
