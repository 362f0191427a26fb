"""Triton token log-probs from materialised logits: launcher, custom op with autograd, public function.

`token_logps(logits [N, V], labels [N])` -> [N] float32 `log_softmax(logits)[n, labels[n]]`, 0 where the
label is `ignore_index`; the same contract as `torch_logps.TorchTokenLogps`. The forward saves only the
per-token log-sum-exp ([N] float32); the backward writes `g * (onehot - softmax)` in the logits' dtype
directly, so the op never holds a float32 copy of the logits.

The two kernel launches are registered as torch custom ops (`dpo_fast::token_logps_fwd` / `_bwd`) with
their autograd formula, so `torch.compile` traces through them without a graph break:
- compiled Triton (CUDA): `torch.library.triton_op` + `wrap_triton`, which Inductor can see into;
- Triton's interpreter (CPU, TRITON_INTERPRET=1): an opaque `torch.library.custom_op` with a fake
  implementation, because `triton_op` runs the kernel on fake tensors when the kernel is interpreted.
The choice follows what `triton.jit` produced for the kernels, i.e. what Triton itself decided.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from dpo_fast.kernels.logps import _token_logps_bwd, _token_logps_fwd

# Bytes of one vocab tile: 16 KB is four 128-bit vectors per thread over 8 warps (256 threads), so a
# program has 16 KB of loads in flight per tile and, with the kernels' prefetch, 32 KB: 8192 entries of
# bf16/fp16, 4096 of fp32. Wider tiles would raise the register count (fewer programs per SM) for no
# more bytes in flight per SM; narrower ones put fewer bytes in flight than the H200's latency x
# bandwidth product asks of each SM (about 4.8 TB/s x ~0.7 us / 132 SMs = 25 KB). A ragged vocabulary's
# padded tail wastes at most one tile of arithmetic, never bytes (masked lanes move nothing).
# Reasoned from the ptxas register counts, not yet timed: the 4096-element tile it replaces measured 50-62%
# of copy bandwidth on the H200 (2026-11-29); `benchmarks/gpu_check.sh`'s logits-in row decides.
# Under the interpreter a tile costs a fixed handful of numpy calls whatever its width, so the same wide
# tile is also the fastest there (5 x 32003 fwd+bwd: 0.10 s at 4096, 0.30 s at 1024); tests pass a small
# `block_v` to cover the multi-tile loop on small vocabularies.
TILE_BYTES = 16384
# Bytes each thread loads per tile: four 16-byte vectors.
THREAD_BYTES = 64

_COMPILED = isinstance(_token_logps_fwd, triton.runtime.jit.JITFunction)


def kernel_op(name: str, launcher):
    """`launcher` (a function that launches Triton kernels) as the torch custom op `dpo_fast::<name>`, so that
    torch.compile traces it without a graph break. Compiled Triton (CUDA): `triton_op`, which Inductor sees
    into through `wrap_triton`. Triton's interpreter (TRITON_INTERPRET=1): an opaque `custom_op`, because
    `triton_op` would run the kernel on fake tensors there; the caller registers its fake implementation.
    The choice follows what `triton.jit` produced for the kernels, i.e. what Triton itself decided."""
    register = triton_op if _COMPILED else custom_op
    return register(f"dpo_fast::{name}", mutates_args=())(launcher)


def default_block_v(vocab_size: int, itemsize: int) -> int:
    """The vocab tile width: the vocabulary rounded up to a power of two, capped at TILE_BYTES."""
    return min(triton.next_power_of_2(max(vocab_size, 1)), TILE_BYTES // itemsize)


def num_warps_for(block_v: int, itemsize: int) -> int:
    """Warps per program, by the tile's bytes: THREAD_BYTES per thread (1 warp for a small vocabulary,
    8 for a full 16 KB tile), so every thread issues whole 128-bit vectors."""
    return max(1, min(8, block_v * itemsize // (THREAD_BYTES * 32)))


def _check_inputs(logits: Tensor, labels: Tensor, block_v: int | None) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, V] (tokens x vocab), got {list(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
    if tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(f"labels must have shape [{logits.shape[0]}] (one per logits row), got {list(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v}")


def on_tensor_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not on its arguments' one: a guard that makes them the same
    (an lm_head on cuda:1 under `device_map="auto"`, a reference model on another GPU). The autograd engine
    runs a backward on its tensors' device already, so the forward entry points need it."""
    if t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _unit_vocab_stride(logits: Tensor) -> Tensor:
    # The kernels take any row stride but need consecutive vocab entries; only then is a copy made.
    return logits if logits.stride(1) == 1 or logits.shape[1] == 1 else logits.contiguous()


def launch_forward(logits: Tensor, labels: Tensor, ignore_index: int,
                   block_v: int | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel on [N, V] logits (unit vocab stride), int64 labels: ([N] logps, [N] lse) float32.
    Shared by this op and both linear schedules (their logits chunks come from cuBLAS)."""
    n, v = logits.shape
    logps = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    block_v = default_block_v(v, logits.element_size()) if block_v is None else block_v
    if n > 0:
        wrap_triton(_token_logps_fwd)[(n,)](
            logits, labels, logps, lse, logits.stride(0), v, ignore_index,
            BLOCK_V=block_v, num_warps=num_warps_for(block_v, logits.element_size()),
        )
    return logps, lse


def launch_backward(logits: Tensor, labels: Tensor, lse: Tensor, grad: Tensor, ignore_index: int, out: Tensor,
                    block_v: int | None = None) -> None:
    """out <- grad * (onehot - softmax(logits)), row by row; `out` is contiguous [N, V] and may be `logits`
    itself (the linear schedules' in-place gradient). grad: [N] contiguous."""
    n, v = logits.shape
    block_v = default_block_v(v, logits.element_size()) if block_v is None else block_v
    if n > 0:
        wrap_triton(_token_logps_bwd)[(n,)](
            logits, labels, lse, grad, out, logits.stride(0), v, ignore_index,
            BLOCK_V=block_v, num_warps=num_warps_for(block_v, logits.element_size()),
        )


def _forward_impl(logits: Tensor, labels: Tensor, ignore_index: int, block_v: int) -> tuple[Tensor, Tensor]:
    return launch_forward(_unit_vocab_stride(logits), labels.contiguous(), ignore_index, block_v)


def _backward_impl(logits: Tensor, labels: Tensor, lse: Tensor, grad: Tensor, ignore_index: int,
                   block_v: int) -> Tensor:
    logits = _unit_vocab_stride(logits)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # grad of a sum arrives expanded (stride 0); [N] is small, so a contiguous copy costs nothing.
    launch_backward(logits, labels.contiguous(), lse, grad.contiguous(), ignore_index, dlogits, block_v)
    return dlogits


_fwd_op = kernel_op("token_logps_fwd", _forward_impl)
_bwd_op = kernel_op("token_logps_bwd", _backward_impl)
if not _COMPILED:
    @_fwd_op.register_fake
    def _(logits, labels, ignore_index, block_v):
        n = logits.shape[0]
        return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)

    @_bwd_op.register_fake
    def _(logits, labels, lse, grad, ignore_index, block_v):
        return logits.new_empty(logits.shape, dtype=logits.dtype)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, block_v = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.block_v = block_v
    ctx.mark_non_differentiable(lse)
    # The lse output never gets a gradient: no zero [N] tensor for it, and None for an unused logps.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logps: Tensor | None, grad_lse: Tensor | None):
    logits, labels, lse = ctx.saved_tensors
    dlogits = None
    if grad_logps is not None and ctx.needs_input_grad[0]:
        dlogits = _bwd_op(logits, labels, lse, grad_logps, ctx.ignore_index, ctx.block_v)
    return dlogits, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def token_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, block_v: int | None = None) -> Tensor:
    """Token log-probs from logits, differentiable in the logits.

    Args:
        logits: [N, V] float32/bfloat16/float16, on CUDA (or on the CPU under TRITON_INTERPRET=1). Any
            row stride; a view whose vocab entries are not adjacent is copied once.
        labels: [N] integer target ids; `ignore_index` marks tokens that are not scored.
        block_v: vocab tile width (a power of two); None picks `default_block_v`. Tests set it small to
            run the multi-tile path on small vocabularies.
    Returns:
        [N] float32 `log_softmax(logits)[n, labels[n]]`, 0 where ignored. A label outside [0, V) that is
        not `ignore_index` gives NaN (the public API rejects such labels before calling this).
    """
    _check_inputs(logits, labels, block_v)
    logits = _unit_vocab_stride(logits)
    if block_v is None:
        block_v = default_block_v(logits.shape[1], logits.element_size())
    with on_tensor_device(logits):
        logps, _ = _fwd_op(logits, labels.to(torch.int64), int(ignore_index), int(block_v))
    return logps
