"""Two-pass token log-probs of a linear head on the GPU: logits by cuBLAS in token chunks, softmax by Triton.

`linear_token_logps(hidden [N, H], weight [V, H], labels [N], bias=[V] | None)` -> [N] float32
`log_softmax(hidden @ weight.T + bias)[n, labels[n]]`, 0 where the label is `ignore_index`: the contract of
`torch_logps.TorchLinearTokenLogps`, with the [N, V] logits existing one chunk of tokens at a time.

The schedule of `linear_dpo_loss` on CUDA wherever the one-pass schedule (`triton_one_pass`) does not
apply (see `schedule.py`): the batch-coupled losses (aot, aot_unpaired: a pair's coefficient depends on
the whole batch's ranks), float16, a bias in another dtype than the head, a pair whose logits exceed the
budget; and every caller of token or sequence log-probs without the loss (`linear_sequence_logps`, the
TRL/HF drop-ins, the reference model's pass under no_grad). Tokens are cut into chunks whose logits fit in
`schedule.LOGITS_BUDGET_BYTES`, so any length runs, in bounded memory.

- forward, per chunk: logits = h W^T (+ b) by cuBLAS, in the input dtype (what the model's lm_head
  computes), then the logits-in kernel (`kernels/logps.py`) for the per-token log-sum-exp and log-prob.
  Only the [N] log-sum-exp is kept (and nothing under no_grad, where autograd saves nothing).
- backward, per chunk: the logits again by cuBLAS, the logits-in backward kernel turns them in place into
  D = g (onehot - softmax), then dh = D W and dweight += D^T h by cuBLAS and dbias += the column sums of D.
  2·N·H·V forward + 6·N·H·V backward flops, every one in cuBLAS: the 8·N·H·V roofline of a schedule that
  must see every pair before any gradient (a batch-coupled loss's dL/dlogp needs the whole batch).

dweight's precision. bf16: the chunks' products are summed into dweight in bf16 (cuBLAS accumulates each
product in float32 and adds the running sum before one rounding: one rounding per chunk, as the one-pass
schedule does per pair group and gradient accumulation does per micro-batch); no float32 [V, H] exists.
float32: summed in place, exactly as float32 allows. float16 needs more care, twice:
- D's range: g (onehot - softmax) with g ~ 1e-3 and softmax entries ~ 1e-6 is below fp16's smallest
  normal (6e-5). So each chunk's g is divided by a power of two bounding its largest |g| (exact, and on
  the device: no host sync), making |D| <= 1, and every product is multiplied back in float32.
- dweight's range: a chunk's D^T h sums |h| over up to thousands of tokens and can pass fp16's 65504, so
  that product runs in float32 (D and h upcast per chunk; its float32 output cannot overflow) into a
  float32 accumulator. A float32 [V, H] would cost twice the fp16 weight (2.1 GB at Llama-3's head), so the
  vocabulary is done in groups whose float32 rows fit in WEIGHT_GROUP_BYTES, each group rounded to fp16
  once, and dh then sums the groups' products in a float32 [N, H]. The float32 product forgoes fp16 tensor
  cores for a third of the backward's flops: fp16 heads are rare beside bf16 ones, and cuBLAS's
  fp16-in/fp32-out product (`torch.mm(out_dtype=...)`) is CUDA-only, which would leave the CPU tests
  covering a different path from the GPU's.

The two launches are torch custom ops (`dpo_fast::linear_token_logps_fwd` / `_bwd`) with their autograd
formula, so `torch.compile` traces them without a graph break: `triton_op` + `wrap_triton` for compiled
Triton (CUDA), an opaque `custom_op` with a fake implementation under Triton's interpreter (there
`triton_op` would run the kernel on fake tensors). Chunk bounds come from static shapes: no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import schedule
from .triton_logps import _COMPILED, kernel_op, launch_backward, launch_forward, on_tensor_device

# Bytes of the float32 rows in which a float16 dweight is summed, one vocabulary group at a time (the
# other dtypes need none): 256 MiB, an eighth of Llama-3's head in float32.
WEIGHT_GROUP_BYTES = 2**28


def chunk_tokens(budget_bytes: int, columns: int, bytes_per_logit: int) -> int:
    """Tokens per chunk: their [chunk, columns] logits (and per-logit temporaries) within the budget."""
    return max(1, budget_bytes // (columns * bytes_per_logit))


def weight_group_rows(vocab_size: int, hidden_size: int, group_bytes: int) -> int:
    """Vocabulary rows per group of a float16 dweight: `group_bytes` of float32 rows (at least one)."""
    return max(1, min(vocab_size, group_bytes // (4 * hidden_size)))


def _bias_as(bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # The product runs in the head's dtype; a bias in another dtype joins it there, as in the lm_head.
    return None if bias is None else bias.to(dtype)


def _logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """[chunk, cols] logits in the input dtype, one cuBLAS product (a fresh tensor per chunk: the caching
    allocator hands back the previous chunk's block, and the custom op sees no view of a shared buffer)."""
    return torch.mm(h, w.T) if b is None else torch.addmm(b, h, w.T)


def _forward_impl(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                  budget_bytes: int, group_bytes: int) -> tuple[Tensor, Tensor]:
    """(logps, lse), both [N] float32. group_bytes only travels to the backward."""
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    b = _bias_as(bias, weight.dtype)
    step = chunk_tokens(budget_bytes, v, hidden.element_size())
    parts = []
    for s in range(0, n, step):
        e = min(s + step, n)
        logits = _logits(hidden[s:e], weight, b)
        parts.append(launch_forward(logits, labels[s:e], ignore_index))
        del logits
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _group_labels(labels: Tensor, ignore_index: int, first: int, last: int) -> Tensor:
    """Labels local to vocabulary rows [first, last): -1 where not scored (the kernel's ignore index for
    groups), `last - first` (no column) where the target lies in another group, else label - first."""
    inside = (labels >= first) & (labels < last)
    local = torch.where(inside, labels - first, last - first)
    return torch.where(labels == ignore_index, -1, local)


def _pow2_bound(g: Tensor) -> Tensor:
    """[1] float32: the power of two at or above max |g| (dividing and multiplying by it are exact)."""
    bound = g.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(bound))).reshape(1)


def _backward_impl(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                   lse: Tensor, ignore_index: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                   budget_bytes: int, group_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    n, hs = hidden.shape
    v = weight.shape[0]
    dtype = hidden.dtype
    fp16 = dtype == torch.float16
    # The kernel writes zero rows for ignored tokens whatever g holds; zeroing g there keeps fp16's
    # per-chunk bound to the scored tokens.
    g = torch.where(labels != ignore_index, grad.float(), 0.0)
    rows = weight_group_rows(v, hs, group_bytes) if fp16 and need_weight else v
    grouped = rows < v
    dh = None
    if need_hidden:
        dh = torch.zeros((n, hs), dtype=torch.float32, device=hidden.device) if grouped else \
            torch.empty((n, hs), dtype=dtype, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
    acc = torch.empty((rows, hs), dtype=torch.float32, device=weight.device) if fp16 and need_weight else None
    db = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_bias else None
    b = _bias_as(bias, weight.dtype)
    # fp16's dweight product upcasts D: 4 more bytes per logit in the chunk's budget.
    bytes_per_logit = hidden.element_size() + (4 if acc is not None else 0)
    for first in range(0, v, rows):
        last = min(first + rows, v)
        w_g = weight[first:last]
        b_g = None if b is None else b[first:last]
        y = labels if not grouped else _group_labels(labels, ignore_index, first, last)
        ignore = ignore_index if not grouped else -1
        acc_g = None if acc is None else acc[: last - first].zero_()
        step = chunk_tokens(budget_bytes, last - first, bytes_per_logit)
        for s in range(0, n, step):
            e = min(s + step, n)
            h = hidden[s:e]
            d = _logits(h, w_g, b_g)
            g_c, scale = g[s:e], None
            if fp16:
                scale = _pow2_bound(g_c)
                g_c = g_c / scale
            launch_backward(d, y[s:e], lse[s:e], g_c.contiguous(), ignore, out=d)  # d now holds D
            if need_hidden:
                prod = torch.mm(d, w_g)
                if scale is not None:
                    prod = prod.float().mul_(scale)
                if grouped:
                    dh[s:e] += prod
                else:
                    dh[s:e] = prod
                del prod
            if need_weight:
                if acc_g is not None:
                    acc_g.addmm_(d.T.float(), h.float().mul_(scale))
                else:
                    dw.addmm_(d.T, h)
            if need_bias:
                col_sums = d.sum(dim=0, dtype=torch.float32)
                db[first:last] += col_sums if scale is None else col_sums.mul_(scale)
            del d
        if acc_g is not None:
            dw[first:last].copy_(acc_g)
    # Gradients not asked for come back as distinct empty tensors (op outputs may not alias).
    return (
        dh.to(dtype) if need_hidden else hidden.new_empty(0),
        dw if need_weight else hidden.new_empty(0),
        db.to(bias.dtype) if need_bias else hidden.new_empty(0),
    )


_fwd_op = kernel_op("linear_token_logps_fwd", _forward_impl)
_bwd_op = kernel_op("linear_token_logps_bwd", _backward_impl)
if not _COMPILED:
    @_fwd_op.register_fake
    def _(hidden, weight, bias, labels, ignore_index, budget_bytes, group_bytes):
        n = hidden.shape[0]
        return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)

    @_bwd_op.register_fake
    def _(grad, hidden, weight, bias, labels, lse, ignore_index, need_hidden, need_weight, need_bias,
          budget_bytes, group_bytes):
        return (
            hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else hidden.new_empty(0),
        )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, *config = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.config = config  # ignore_index, budget_bytes, group_bytes
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logps: Tensor | None, grad_lse: Tensor | None):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    grads = [None] * 7
    if grad_logps is None or not (need_hidden or need_weight or need_bias):
        return tuple(grads)
    ignore_index, budget_bytes, group_bytes = ctx.config
    dhidden, dweight, dbias = _bwd_op(grad_logps, hidden, weight, bias, labels, lse, ignore_index,
                                      need_hidden, need_weight, need_bias, budget_bytes, group_bytes)
    grads[0] = dhidden if need_hidden else None
    grads[1] = dweight if need_weight else None
    grads[2] = dbias if need_bias else None
    return tuple(grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> None:
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


def linear_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                       ignore_index: int = -100) -> Tensor:
    """Token log-probs of a linear head, differentiable in hidden, weight and bias (two-pass schedule).

    Args:
        hidden: [N, H] float32/bfloat16/float16/float64, on CUDA or on the CPU under TRITON_INTERPRET=1.
            Any strides.
        weight: [V, H], the dtype of hidden. bias: [V] or None (any float dtype; it joins the product in
            the head's dtype).
        labels: [N] integer target ids; `ignore_index` marks tokens that are not scored. The range is
            not checked here (the public API does it): a label outside [0, V) gives NaN.
    Returns:
        [N] float32 `log_softmax(hidden @ weight.T + bias)[n, labels[n]]`, 0 where ignored.
    The budgets (`schedule.LOGITS_BUDGET_BYTES`, `WEIGHT_GROUP_BYTES`) are read at each call.
    """
    _check_inputs(hidden, weight, labels, bias)
    with on_tensor_device(hidden):
        logps, _ = _fwd_op(hidden, weight, bias, labels.to(torch.int64).contiguous(), int(ignore_index),
                           int(schedule.LOGITS_BUDGET_BYTES), int(WEIGHT_GROUP_BYTES))
    return logps
