"""One-pass DPO loss from hidden states on the GPU: whole pairs' logits by cuBLAS, softmax by Triton.

The default CUDA schedule of `linear_dpo_loss` for pair-separable losses (see `schedule.py`; measured on
an H200 at 1.01x the 6·N·H·V roofline, 0.84x Liger's time, 0.35x its extra memory). It does the 6·N·H·V
flops of the math, all of them in cuBLAS, by taking whole pairs at a time (a pair's coefficient dL/dlogp
is known once its own tokens are seen). For each group of consecutive pairs whose logits fit in
`schedule.LOGITS_BUDGET_BYTES`:

1. logits = h W^T (+ b) for the group's scored tokens: one cuBLAS product into a reused buffer, in
   the input dtype (what the model's lm_head computes);
2. the logits-in forward kernel (`kernels/logps.py`): per-token log-sum-exp and log-prob, one read;
3. the pairs' log-probs, hence dL/dlogp per sequence (torch autograd on the group's [pairs] loss);
4. the logits-in backward kernel turns the buffer, in place, into D = g (onehot - softmax);
5. dh rows = D W and dweight += D^T h (cuBLAS), dbias += the column sums of D.

Memory beyond inputs and gradients: the logits buffer (<= LOGITS_BUDGET_BYTES, one 2 x 1024-token pair
at a 128k vocabulary) and the group's gathered hidden rows. Nothing [V, H] in float32: dweight sums
the groups' products in its own dtype (cuBLAS accumulates each product in float32 and adds it to the
running sum before one rounding: one rounding per group, as gradient accumulation over micro-batches
does). float16 (whose range the running dweight sum would leave), a bias in another dtype, and a pair
whose logits exceed the budget go to the two-pass schedule (`triton_linear`), which chunks tokens.

On the CPU it runs under TRITON_INTERPRET=1 like every Triton path (the tests' route), where the products
are torch's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formulas import LossConfig
from . import schedule
from .torch_one_pass import (
    _batch_loss,
    _group_by_pair,
    _OrderedRows,
    check_pair_inputs,
    hand_over_grads,
    one_pass_output,
    pair_grads,
)
from .triton_logps import launch_backward, launch_forward, on_tensor_device


def _pair_groups(offsets: list[int], num_pairs: int, vocab: int, itemsize: int) -> list[tuple[int, int]]:
    """Consecutive pairs [i0, i1) whose logits fit in the budget together (at least one pair each)."""
    max_tokens = max(1, schedule.LOGITS_BUDGET_BYTES // (vocab * itemsize))
    groups, i0 = [], 0
    while i0 < num_pairs:
        i1 = i0 + 1
        while i1 < num_pairs and offsets[2 * i1 + 2] - offsets[2 * i0] <= max_tokens:
            i1 += 1
        groups.append((i0, i1))
        i0 = i1
    return groups


class TritonOnePassLinearDPO(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None) -> (loss, [2B] sequence log-probs); the forward
    finishes the gradients, the backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, segment_ids: Tensor,
                num_sequences: int, ignore_index: int, config: LossConfig, ref_chosen: Tensor | None,
                ref_rejected: Tensor | None, lengths: Tensor | None, grad_enabled: bool):
        device, dtype = hidden.device, hidden.dtype
        b = num_sequences // 2
        v = weight.shape[0]
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        need_grads = need_h or need_w or need_b
        order, offsets, sequence_of = _group_by_pair(labels, segment_ids, ignore_index, b)
        rows_of = _OrderedRows(order)
        dhidden = torch.zeros_like(hidden) if need_h else None
        dweight = torch.zeros_like(weight) if need_w else None
        dbias = torch.zeros(v, dtype=torch.float32, device=device) if need_b else None
        seq = torch.zeros(num_sequences, dtype=torch.float32, device=device)
        groups = _pair_groups(offsets, b, v, hidden.element_size())
        buffer = torch.empty(max((offsets[2 * i1] - offsets[2 * i0] for i0, i1 in groups), default=0) * v,
                             dtype=dtype, device=device)

        with on_tensor_device(hidden):
            for i0, i1 in groups:
                start, end = offsets[2 * i0], offsets[2 * i1]
                if end == start:
                    continue
                span = rows_of.span(start, end)
                h = rows_of.take(hidden, start, end, span)
                y = rows_of.take(labels, start, end, span).to(torch.int64).contiguous()  # the kernels read int64
                logits = buffer[: (end - start) * v].view(end - start, v)
                if bias is None:
                    torch.mm(h, weight.T, out=logits)
                else:
                    torch.addmm(bias, h, weight.T, out=logits)
                tok, lse = launch_forward(logits, y, ignore_index)
                local = sequence_of[start:end] - 2 * i0  # 2k: pair i0 + k's chosen response, 2k + 1 its rejected
                sums = torch.zeros(2 * (i1 - i0), dtype=torch.float32, device=device).index_add_(0, local, tok)
                seq[i0:i1], seq[b + i0:b + i1] = sums[0::2], sums[1::2]
                if not need_grads:
                    continue
                g_c, g_r = pair_grads(config, sums[0::2], sums[1::2], ref_chosen, ref_rejected, lengths, i0, i1, b)
                g_tok = torch.stack([g_c, g_r], dim=1).reshape(-1)[local].contiguous()
                launch_backward(logits, y, lse, g_tok, ignore_index, out=logits)  # logits now holds D
                if need_h:
                    dh = torch.mm(logits, weight)
                    if span is not None:
                        dhidden[span] = dh
                    else:
                        dhidden.index_copy_(0, order[start:end], dh)
                    del dh
                if need_w:
                    dweight.addmm_(logits.T, h)
                if need_b:
                    dbias.add_(logits.sum(dim=0, dtype=torch.float32))
                del h, logits

        loss = _batch_loss(config, seq, b, ref_chosen, ref_rejected, lengths)
        ctx.mark_non_differentiable(seq)
        ctx.grads = (dhidden, dweight, dbias) if need_grads else (None, None, None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss, seq

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_seq: Tensor | None):
        return (*hand_over_grads(ctx, grad_loss), None, None, None, None, None, None, None, None, None)


def linear_dpo_loss_pair_chunks(config: LossConfig, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                labels: Tensor, segment_ids: Tensor, num_sequences: int, ignore_index: int,
                                ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
                                lengths: Tensor | None):
    """DPO loss of a pair-separable loss by this schedule; returns a `DPOOutput`. Same contract as
    `torch_one_pass.linear_dpo_loss_one_pass` (packed form, sequences 0..B-1 chosen, B..2B-1 rejected);
    `schedule.linear_loss_schedule` says when it applies."""
    check_pair_inputs(config, num_sequences // 2, ref_chosen_logps, ref_rejected_logps, lengths, hidden.device)
    loss, seq = TritonOnePassLinearDPO.apply(
        hidden, weight, bias, labels, segment_ids, num_sequences, ignore_index, config, ref_chosen_logps,
        ref_rejected_logps, lengths, torch.is_grad_enabled(),
    )
    return one_pass_output(config, loss, seq, ref_chosen_logps, ref_rejected_logps, lengths)
