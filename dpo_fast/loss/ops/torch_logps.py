"""Chunked pure-torch token log-probs: the CPU path, memory-lean by construction.

Both Functions map tokens to `log_softmax(logits)[label]` (0 where the label is ignored) and never
hold more than one `[chunk, V]` float32 tile beyond their inputs. The backward writes
`dlogits = g * (onehot - softmax)` from the saved per-token log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Tokens per tile. A [256, 32000] fp32 tile is 33 MB: small beside full logits, large enough that
# the matmuls stay efficient on the CPU.
DEFAULT_CHUNK_TOKENS = 256


def _tile_logps(logits_f32: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(logits_f32, dim=-1)
    target = logits_f32.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, target - lse, 0.0), lse


def _tile_grad(logits_f32: Tensor, labels: Tensor, valid: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """g * (onehot - softmax) for one tile, in float32; rows with invalid labels get 0."""
    g = torch.where(valid, g, 0.0)
    # One temporary tile: the subtraction allocates it, exp and the scaling run in place (the input may
    # be the caller's own float32 logits, so it is never written).
    grad = (logits_f32 - lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
    rows = valid.nonzero().squeeze(-1)
    grad[rows, labels[rows]] += g[rows]
    return grad


class TorchTokenLogps(torch.autograd.Function):
    """[N, V] logits, [N] labels -> [N] float32 token log-probs."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, chunk: int) -> Tensor:
        n = logits.shape[0]
        valid = labels != ignore_index
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out[s:e], lse[s:e] = _tile_logps(logits[s:e].float(), labels[s:e], valid[s:e])
        ctx.save_for_backward(logits, labels, valid, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, labels, valid, lse = ctx.saved_tensors
        dlogits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, logits.shape[0])
            dlogits[s:e] = _tile_grad(logits[s:e].float(), labels[s:e], valid[s:e], lse[s:e], grad_out[s:e])
        return dlogits, None, None, None


def token_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                chunk: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    return TorchTokenLogps.apply(logits, labels, ignore_index, chunk)


def _linear_tile(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


class TorchLinearTokenLogps(torch.autograd.Function):
    """[N, H] hidden, [V, H] weight, [V] bias -> [N] float32 token log-probs, logits never materialised.

    Recompute schedule: the forward keeps only the per-token log-sum-exp; the backward recomputes each
    logit tile (8·N·H·V flops in all, one tile of memory).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk: int):
        n = hidden.shape[0]
        valid = labels != ignore_index
        out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out[s:e], lse[s:e] = _tile_logps(_linear_tile(hidden[s:e], weight, bias), labels[s:e], valid[s:e])
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dhidden = torch.empty_like(hidden) if need_h else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        dbias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w32 = weight.float()
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, hidden.shape[0])
            if not bool(valid[s:e].any()):
                if need_h:
                    dhidden[s:e] = 0
                continue
            h = hidden[s:e]
            g = _tile_grad(_linear_tile(h, weight, bias), labels[s:e], valid[s:e], lse[s:e], grad_out[s:e])
            if need_h:
                dhidden[s:e] = (g @ w32).to(hidden.dtype)
            if need_w:
                dweight.addmm_(g.T, h.float())
            if need_b:
                dbias += g.sum(0)
        return (
            dhidden,
            None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype),
            None, None, None,
        )


def linear_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                       ignore_index: int = -100, chunk: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    return TorchLinearTokenLogps.apply(hidden, weight, bias, labels, ignore_index, chunk)
