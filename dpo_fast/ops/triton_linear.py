"""Triton fused-linear token log-probs: launcher, custom op with autograd, public function.

`linear_token_logps(hidden [N, H], weight [V, H], labels [N], bias=[V] | None)` -> [N] float32
`log_softmax(hidden @ weight.T + bias)[n, labels[n]]`, 0 where the label is `ignore_index`: the contract
of `torch_logps.TorchLinearTokenLogps`, without the [N, V] logits ever existing. Each kernel rebuilds
the logits one tile at a time (see `dpo_fast/kernels/linear_logps.py`); the forward keeps only the
per-token log-sum-exp. Two backward schedules:
- "tiles" (default): all in tl.dot, the logits rebuilt once for the hidden gradient and once for the
  weight gradient: 2·N·H·V forward + 8·N·H·V backward flops, transient memory one tile per program.
- "chunked": a kernel writes `g * (onehot - softmax)` for a chunk of tokens and cuBLAS does the two
  products: 6·N·H·V backward flops (4 of them in cuBLAS) and a [chunk, V] buffer (<= 256 MiB).
Either way, memory beyond inputs and gradients is a few [N] vectors plus float32 accumulators for the
gradients of 16-bit hidden/weight: [N, H], and for dweight a [group, H] buffer of at most
WEIGHT_GROUP_BYTES (the vocabulary is done group by group).

The kernel launches are torch custom ops (`dpo_fast::linear_token_logps_fwd` / `_bwd`) with their
autograd formula, so `torch.compile` traces them without a graph break: `triton_op` + `wrap_triton`
for compiled Triton (CUDA), an opaque `custom_op` with a fake implementation under Triton's
interpreter (there `triton_op` would run the kernel on fake tensors).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from dpo_fast.kernels.linear_logps import (
    _linear_logps_bwd_dlogits,
    _linear_logps_bwd_hidden,
    _linear_logps_bwd_weight,
    _linear_logps_fwd,
)

_COMPILED = isinstance(_linear_logps_fwd, triton.runtime.jit.JITFunction)


class LinearBlocks(NamedTuple):
    """Tile shape of the kernels: powers of two, each >= 16 (the smallest tl.dot operand)."""

    block_n: int  # tokens per tile
    block_v: int  # vocab entries per tile
    block_h: int  # hidden features per tl.dot step


# H100, untimed (no GPU was at hand): the largest tiles for which ptxas reports no register spill in
# any of the four kernels at 8 warps, compiled offline for sm_90 with Triton 3.9. BLOCK_H = 64 spills
# in the backward kernels (684 bytes in the weight one), and fp32 (FMA, not tensor cores) needs the
# narrower vocab tile. 64 x 128 tiles put a 128k vocabulary in 1k tiles.
CUDA_BLOCKS = LinearBlocks(block_n=64, block_v=128, block_h=32)
CUDA_BLOCKS_FP32 = LinearBlocks(block_n=64, block_v=64, block_h=32)
CUDA_NUM_WARPS = 8
CUDA_NUM_STAGES = 2
# Under the interpreter a tile step costs milliseconds of Python whatever its size (a 32003 vocabulary
# took 9 s in 256-wide tiles, 0.6 s in 1024-wide ones), so the vocab tile is wide; the token tile stays
# near the tests' token counts so little padding is computed.
INTERPRETED_BLOCKS = LinearBlocks(block_n=32, block_v=1024, block_h=64)


def default_blocks(device: torch.device, dtype: torch.dtype) -> LinearBlocks:
    if device.type != "cuda":
        return INTERPRETED_BLOCKS
    return CUDA_BLOCKS if dtype in (torch.bfloat16, torch.float16) else CUDA_BLOCKS_FP32


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_v_splits(num_tokens: int, vocab_size: int, blocks: LinearBlocks, device: torch.device) -> int:
    """Vocab splits for the token-tile kernels: enough programs for two waves on the GPU.

    N = 4096 tokens are only 64 token tiles, half an H100; splitting the vocabulary gives every SM work.
    The interpreter runs programs one after another, so there it is 1.
    """
    if device.type != "cuda":
        return 1
    token_tiles = triton.cdiv(max(num_tokens, 1), blocks.block_n)
    vocab_tiles = triton.cdiv(vocab_size, blocks.block_v)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(vocab_tiles, triton.cdiv(2 * _num_sms(index), token_tiles)))


def dhidden_splits(v_splits: int) -> int:
    """Vocab splits of the dhidden kernel: they add into the same rows in whatever order they run, so
    torch's deterministic mode gets one split (bitwise reproducible, fewer programs)."""
    return 1 if torch.are_deterministic_algorithms_enabled() else v_splits


def _split_plan(vocab_size: int, block_v: int, v_splits: int) -> tuple[int, int]:
    """(splits, vocab tiles per split) with no empty split."""
    vocab_tiles = triton.cdiv(vocab_size, block_v)
    tiles_per_split = triton.cdiv(vocab_tiles, max(1, min(v_splits, vocab_tiles)))
    return triton.cdiv(vocab_tiles, tiles_per_split), tiles_per_split


def _launch_options(device: torch.device) -> dict:
    return {"num_warps": CUDA_NUM_WARPS, "num_stages": CUDA_NUM_STAGES} if device.type == "cuda" else {}


def _input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input_precision: fp32 inputs follow torch's own matmul setting (TF32 tensor cores only
    where the user allowed them); 16-bit inputs keep Triton's default, the matmul tutorials' path."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (see kernels' _dot).
    return not _COMPILED and dtype == torch.bfloat16


def _kernel_operand(t: Tensor) -> Tensor:
    """Unit stride along H (the kernels' only layout demand); float64 runs as float32, like the dots."""
    if t.dtype == torch.float64:
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward_impl(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                  block_n: int, block_v: int, block_h: int, v_splits: int,
                  chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """(logps, lse). chunk_tokens only travels to the backward (0: the all-tl.dot schedule)."""
    h, w = _kernel_operand(hidden), _kernel_operand(weight)
    labels = labels.contiguous()
    n, v = h.shape[0], w.shape[0]
    splits, tiles_per_split = _split_plan(v, block_v, v_splits)
    part_max = torch.empty((splits, n), dtype=torch.float32, device=h.device)
    part_sum = torch.empty_like(part_max)
    part_target = torch.empty_like(part_max)
    if n > 0:
        wrap_triton(_linear_logps_fwd)[(triton.cdiv(n, block_n), splits)](
            h, w, w if bias is None else bias, labels, part_max, part_sum, part_target,
            n, v, h.shape[1], h.stride(0), w.stride(0), tiles_per_split,
            HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(h.dtype), UPCAST_DOT=_upcast_dot(h.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, **_launch_options(h.device),
        )
    # Merge the splits' online log-sum-exps: [splits, N] -> [N].
    m = part_max.amax(dim=0)
    lse = m + torch.log((part_sum * torch.exp(part_max - m)).sum(dim=0))
    valid = labels != ignore_index
    logps = torch.where(valid, part_target.sum(dim=0) - lse, 0.0)
    # A label outside [0, V) picked no logit: NaN poisons the loss instead of scoring a wrong token.
    logps = torch.where(valid & ((labels < 0) | (labels >= v)), float("nan"), logps)
    return logps, lse


def _backward_impl(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                   lse: Tensor, ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                   block_n: int, block_v: int, block_h: int, v_splits: int,
                   chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    h, w = _kernel_operand(hidden), _kernel_operand(weight)
    labels = labels.contiguous()
    # The kernels read g == 0 as "not scored" (and skip all-zero tiles); [N] is small, so this is free.
    g = torch.where(labels != ignore_index, grad.float(), 0.0).contiguous()
    common = dict(HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(h.dtype),
                  UPCAST_DOT=_upcast_dot(h.dtype), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
                  **_launch_options(h.device))
    b = w if bias is None else bias
    run = _backward_chunked if chunk_tokens > 0 else _backward_tiles
    acc_h, acc_w, acc_b = run(h, w, b, labels, lse, g, need_hidden, need_weight, need_bias, common,
                              v_splits=v_splits, chunk_tokens=chunk_tokens)
    # Gradients not asked for come back as distinct empty tensors (op outputs may not alias).
    return (
        acc_h.to(hidden.dtype) if need_hidden else hidden.new_empty(0),
        acc_w.to(weight.dtype) if need_weight else hidden.new_empty(0),
        acc_b.to(bias.dtype) if need_bias else hidden.new_empty(0),
    )


class _GroupedWeightGrad:
    """dweight [V, H] summed one vocab group at a time. A float32 weight's gradient is accumulated in place
    (one group, the whole vocabulary). A 16-bit one is still the float32 sum over all tokens, rounded once,
    but its float32 rows exist for one group at a time: a [group, H] buffer instead of a [V, H] one
    (Llama-3's head: 2.1 GB -> <= 277 MB). `need_weight` False: groups of the whole vocabulary, no storage.
    """

    def __init__(self, w: Tensor, need_weight: bool, block_v: int):
        v, hs = w.shape
        self.in_place = w.dtype == torch.float32
        self.rows = weight_group_rows(v, hs, block_v, w.device) if need_weight and not self.in_place else v
        self.dweight = self.buffer = None
        if need_weight:
            self.dweight = torch.zeros((v, hs), dtype=torch.float32, device=w.device) if self.in_place else \
                torch.empty((v, hs), dtype=w.dtype, device=w.device)
            if not self.in_place:
                self.buffer = torch.empty((self.rows, hs), dtype=torch.float32, device=w.device)

    def groups(self, v: int):
        """(first, last, float32 accumulator of rows first..last or None); each group's accumulator is
        rounded into dweight once the loop body for it is done."""
        for first in range(0, v, self.rows):
            last = min(first + self.rows, v)
            if self.dweight is None:
                yield first, last, None
            elif self.in_place:
                yield first, last, self.dweight[first:last]
            else:
                acc = self.buffer[: last - first].zero_()
                yield first, last, acc
                self.dweight[first:last].copy_(acc)


def _backward_tiles(h, w, b, labels, lse, g, need_hidden, need_weight, need_bias, common, *, v_splits,
                    chunk_tokens):
    """All tl.dot: float32 accumulators for dhidden [N, H] and dbias [V]; dweight in float32 for one vocab
    group at a time (all of it for a float32 weight), rounded to the weight's dtype group by group."""
    n, v, hs = h.shape[0], w.shape[0], h.shape[1]
    block_n, block_v = common["BLOCK_N"], common["BLOCK_V"]
    acc_h = acc_w = acc_b = None
    if need_hidden:
        acc_h = torch.zeros((n, hs), dtype=torch.float32, device=h.device)
        if n > 0:
            splits, tiles_per_split = _split_plan(v, block_v, dhidden_splits(v_splits))
            wrap_triton(_linear_logps_bwd_hidden)[(triton.cdiv(n, block_n), splits)](
                h, w, b, labels, lse, g, acc_h, n, v, hs, h.stride(0), w.stride(0), tiles_per_split, **common,
            )
    if need_weight or need_bias:
        acc_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_bias else None
        weight_grad = _GroupedWeightGrad(w, need_weight, block_v)
        for first, last, acc_w in weight_grad.groups(v):
            # The group's slice of the head: labels are shifted so that the onehot compares group-local ids
            # (a label outside the group matches no column; ignored tokens have g == 0 and are skipped).
            wrap_triton(_linear_logps_bwd_weight)[(triton.cdiv(last - first, block_v),)](
                h, w[first:last], b if b is w else b[first:last], labels if first == 0 else labels - first, lse, g,
                g if acc_w is None else acc_w, g if acc_b is None else acc_b[first:last],
                n, last - first, hs, h.stride(0), w.stride(0), COMPUTE_WEIGHT=need_weight, COMPUTE_BIAS=need_bias,
                **common,
            )
        return acc_h, weight_grad.dweight, acc_b
    return acc_h, None, None


def _backward_chunked(h, w, b, labels, lse, g, need_hidden, need_weight, need_bias, common, *, v_splits,
                      chunk_tokens):
    """A Triton kernel writes `g * (onehot - softmax)` for `chunk_tokens` tokens at a time, in the input
    dtype and divided by a power of two bounding the chunk's |g|; cuBLAS does the two products.

    dweight adds one matmul per chunk into a float32 buffer, each rounded to the input dtype first: a
    second rounding of at most half an ulp per chunk, the price of tensor-core products. fp16 runs that
    product in float32, since a chunk's sum over tokens of |hidden| can pass fp16's 65504.

    As in "tiles", a 16-bit dweight's float32 rows exist for one vocab group at a time (the outer loop;
    the token chunks run inside it, so the logits are still computed once). dhidden is then a sum over
    the groups' products, each rounded to the input dtype, in a float32 [N, H] buffer; with a single
    group (a float32 weight, or no dweight asked for) each chunk's rows are one product written once.
    """
    n, v, hs = h.shape[0], w.shape[0], h.shape[1]
    block_n, block_v = common["BLOCK_N"], common["BLOCK_V"]
    weight_grad = _GroupedWeightGrad(w, need_weight, block_v)
    rows = weight_grad.rows
    grouped = rows < v
    acc_h = None
    if need_hidden:
        acc_h = torch.zeros((n, hs), dtype=torch.float32, device=h.device) if grouped else \
            torch.empty((n, hs), dtype=h.dtype, device=h.device)
    acc_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_bias else None
    # One flat buffer viewed as [chunk, group columns]: the kernel writes contiguous rows.
    dlogits_flat = torch.empty(min(chunk_tokens, n) * rows, dtype=h.dtype, device=h.device)
    product_dtype = torch.float32 if h.dtype == torch.float16 else h.dtype
    piece_rows = max(1, PRODUCT_PIECE_ELEMENTS // hs)
    chunks = []
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        # 2^ceil(log2 max|g|): dividing and multiplying by it are exact, and |d| <= 1 (no fp16 underflow).
        bound = g[s:e].abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        chunks.append((s, e, torch.exp2(torch.ceil(torch.log2(bound))).reshape(1)))
    for first, last, acc_w in weight_grad.groups(v):
        cols = last - first
        w_group = w[first:last]
        labels_group = labels if first == 0 else labels - first  # group-local ids for the onehot
        for s, e, scale in chunks:
            d = dlogits_flat[: (e - s) * cols].view(e - s, cols)
            wrap_triton(_linear_logps_bwd_dlogits)[(triton.cdiv(e - s, block_n), triton.cdiv(cols, block_v))](
                h[s:e], w_group, b if b is w else b[first:last], labels_group[s:e], lse[s:e], g[s:e], scale, d,
                e - s, cols, hs, h.stride(0), w.stride(0), **common,
            )
            if need_hidden:
                # The rescale in float32: exact, where scale itself may not exist in fp16.
                if grouped:
                    acc_h[s:e].add_(torch.mm(d, w_group).float().mul_(scale))
                else:
                    acc_h[s:e] = torch.mm(d, w_group).float().mul_(scale)
            if need_weight:
                h_chunk = h[s:e].to(product_dtype)
                # In row pieces of the vocabulary: the product's temporaries stay small (not [V, H] twice).
                for r in range(0, cols, piece_rows):
                    part = torch.mm(d[:, r:r + piece_rows].T.to(product_dtype), h_chunk)
                    acc_w[r:r + piece_rows].add_(part.float().mul_(scale))
            if need_bias:
                acc_b[first:last].add_(d.sum(dim=0, dtype=torch.float32).mul_(scale))
    return acc_h, weight_grad.dweight, acc_b


if _COMPILED:
    _fwd_op = triton_op("dpo_fast::linear_token_logps_fwd", mutates_args=())(_forward_impl)
    _bwd_op = triton_op("dpo_fast::linear_token_logps_bwd", mutates_args=())(_backward_impl)
else:
    _fwd_op = custom_op("dpo_fast::linear_token_logps_fwd", mutates_args=())(_forward_impl)
    _bwd_op = custom_op("dpo_fast::linear_token_logps_bwd", mutates_args=())(_backward_impl)

    @_fwd_op.register_fake
    def _(hidden, weight, bias, labels, ignore_index, block_n, block_v, block_h, v_splits, chunk_tokens):
        n = hidden.shape[0]
        return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)

    @_bwd_op.register_fake
    def _(grad, hidden, weight, bias, labels, lse, ignore_index, need_hidden, need_weight, need_bias,
          block_n, block_v, block_h, v_splits, chunk_tokens):
        return (
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0),
        )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, *config = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.config = config  # ignore_index, block_n, block_v, block_h, v_splits, chunk_tokens
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logps: Tensor | None, grad_lse: Tensor | None):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = [None] * 10
    if grad_logps is None or not (need_hidden or need_weight or need_bias):
        return tuple(grads)
    ignore_index, *tiling = ctx.config
    dhidden, dweight, dbias = _bwd_op(grad_logps, hidden, weight, bias, labels, lse, ignore_index,
                                      need_hidden, need_weight, need_bias and bias is not None, *tiling)
    grads[0] = dhidden if need_hidden else None
    grads[1] = dweight if need_weight else None
    grads[2] = dbias if need_bias and bias is not None else None
    return tuple(grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
                  blocks: LinearBlocks) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, H] (tokens x hidden), got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[1]}] (vocab x hidden), got {list(weight.shape)}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"weight {list(weight.shape)} has an empty vocab or hidden dimension")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; cast one of them (as for a matmul)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels must have shape [{hidden.shape[0]}] (one per hidden row), got {list(labels.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    for field, size in zip(blocks._fields, blocks):
        if size < 16 or size & (size - 1):
            raise ValueError(f"blocks.{field} must be a power of two >= 16 (tl.dot's smallest tile), got {size}")


# Bytes of the float32 buffer in which both schedules sum a 16-bit dweight, one vocab group at a time
# (one launch of the weight kernel, or one pass over the token chunks, per group). Untimed on a GPU: a
# group also keeps at least one program per SM (see weight_group_rows), so a launch fills the device.
WEIGHT_GROUP_BYTES = 2**28


def weight_group_rows(vocab_size: int, hidden_size: int, block_v: int, device: torch.device) -> int:
    """Vocab rows per group of the weight kernel: WEIGHT_GROUP_BYTES of float32 rows, a multiple of
    block_v, and on CUDA at least one vocab tile per SM."""
    rows = max(block_v, WEIGHT_GROUP_BYTES // (4 * hidden_size) // block_v * block_v)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        rows = max(rows, _num_sms(index) * block_v)
    return min(rows, vocab_size)


SCHEDULES = ("tiles", "chunked")
# The backward `linear_token_logps` uses when none is named (the public API names none). "tiles" until a
# GPU benchmark says otherwise: benchmarks/bench_loss.py times both on CUDA by setting this.
DEFAULT_SCHEDULE = "tiles"
# Elements of dweight per cuBLAS product of the chunked schedule: 64 MiB of float32 temporaries.
PRODUCT_PIECE_ELEMENTS = 2**24


def default_chunk_tokens(vocab_size: int, itemsize: int, block_n: int) -> int:
    """Tokens per chunk of the "chunked" backward: a [chunk, V] buffer of at most 256 MiB."""
    return max(block_n, (2**28 // (vocab_size * itemsize)) // block_n * block_n)


def linear_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                       ignore_index: int = -100, schedule: str | None = None, blocks: LinearBlocks | None = None,
                       v_splits: int | None = None, chunk_tokens: int | None = None) -> Tensor:
    """Token log-probs of a linear head, differentiable in hidden, weight and bias.

    Args:
        hidden: [N, H] float32/bfloat16/float16 (float64 runs in float32), on CUDA or on the CPU under
            TRITON_INTERPRET=1. Any row stride.
        weight: [V, H], the dtype of hidden. bias: [V] or None.
        labels: [N] integer target ids; `ignore_index` marks tokens that are not scored. The range is
            not checked here (the public API does it): a label outside [0, V) gives NaN.
        blocks: tile shape (`LinearBlocks`); None picks `default_blocks`. Tests set small tiles to run
            the multi-tile paths on small shapes.
        schedule: the backward; None is DEFAULT_SCHEDULE. "tiles": all in tl.dot, memory bounded by a
            tile (8·N·H·V flops). "chunked": Triton writes `g * (onehot - softmax)` for `chunk_tokens`
            tokens at a time and cuBLAS does the two products (6·N·H·V flops, a [chunk, V] buffer in the
            input dtype). Both keep a 16-bit dweight's float32 sums for one vocab group at a time.
            Which is faster on a given GPU is for a benchmark to say; neither has been timed yet.
        v_splits: vocab splits of the token-tile kernels; None picks `default_v_splits`.
        chunk_tokens: tokens per chunk of the "chunked" schedule; None picks `default_chunk_tokens`.
    Returns:
        [N] float32 `log_softmax(hidden @ weight.T + bias)[n, labels[n]]`, 0 where ignored.
    """
    blocks = default_blocks(hidden.device, hidden.dtype) if blocks is None else LinearBlocks(*blocks)
    _check_inputs(hidden, weight, labels, bias, blocks)
    if v_splits is None:
        v_splits = default_v_splits(hidden.shape[0], weight.shape[0], blocks, hidden.device)
    elif v_splits < 1:
        raise ValueError(f"v_splits must be >= 1, got {v_splits}")
    if schedule is None:
        schedule = DEFAULT_SCHEDULE
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; expected one of {', '.join(SCHEDULES)}")
    if schedule == "tiles":
        chunk_tokens = 0
    elif chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.element_size(), blocks.block_n)
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    logps, _ = _fwd_op(hidden, weight, bias, labels.to(torch.int64), int(ignore_index), *map(int, blocks),
                       int(v_splits), int(chunk_tokens))
    return logps
