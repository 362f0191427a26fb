"""The plain-torch oracle: full logits, log_softmax, gather, in float64 by default.

This is what TRL did before it fused anything: simple enough to be obviously right, and the
yardstick for every fast path (tests compare against it in float64; benchmarks run it in the
input dtype as the "naive" baseline). It shares nothing with the fast paths except the pair-level
loss formulas in `dpo_fast.loss.formulas`, which act on [B] vectors and are tested on their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formulas import DPOOutput, LossConfig, loss_from_logps


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if t is None or dtype is None:
        return t
    return t.to(dtype)


def token_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """log_softmax(logits)[..., labels] with 0 where labels == ignore_index; any leading shape."""
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def sequence_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, average: bool = False,
    dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """[R, T, V] logits, [R, T] labels -> [R] summed (or per-token mean) log-probs."""
    logits = _cast(logits, dtype)
    total = token_logps(logits, labels, ignore_index=ignore_index).sum(-1)
    if average:
        return total / (labels != ignore_index).sum(-1).clamp(min=1)
    return total


def packed_sequence_logps(
    logits: Tensor, labels: Tensor, segment_ids: Tensor, num_sequences: int, *,
    ignore_index: int = -100, dtype: torch.dtype | None = torch.float64,
) -> tuple[Tensor, Tensor]:
    """[N, V] logits, [N] labels and segment ids -> ([S] summed log-probs, [S] scored-token counts)."""
    logits = _cast(logits, dtype)
    scored = (labels != ignore_index) & (segment_ids >= 0)
    tok = token_logps(logits, torch.where(scored, labels, torch.full_like(labels, ignore_index)),
                      ignore_index=ignore_index)
    seg = segment_ids[scored].long()
    logps = torch.zeros(num_sequences, dtype=tok.dtype, device=tok.device).index_add(0, seg, tok[scored])
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=tok.device).index_add(
        0, seg, torch.ones_like(seg))
    return logps, lengths


def _logps_and_lengths(logits, labels, segment_ids, ignore_index, dtype):
    if segment_ids is None:
        mask = labels != ignore_index
        return token_logps(_cast(logits, dtype), labels, ignore_index=ignore_index).sum(-1), mask.sum(-1)
    num_sequences = int(segment_ids.max()) + 1
    return packed_sequence_logps(logits, labels, segment_ids, num_sequences, ignore_index=ignore_index, dtype=dtype)


def _linear_logits(hidden, weight, bias, dtype):
    logits = _cast(hidden, dtype) @ _cast(weight, dtype).T
    return logits if bias is None else logits + _cast(bias, dtype)


def fused_dpo_loss(
    logits: Tensor, labels: Tensor, ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None, *, ignore_index: int = -100, segment_ids: Tensor | None = None,
    dtype: torch.dtype | None = torch.float64, **loss_kwargs,
) -> DPOOutput:
    """Naive `fused_dpo_loss`: padded [2B, T, V] or packed [N, V] with `segment_ids`."""
    config = LossConfig(**loss_kwargs)
    logps, lengths = _logps_and_lengths(logits, labels, segment_ids, ignore_index, dtype)
    b = logps.shape[0] // 2
    return loss_from_logps(
        config, logps[:b], logps[b:], _cast(ref_chosen_logps, logps.dtype), _cast(ref_rejected_logps, logps.dtype),
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
    )


def linear_dpo_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None, *, bias: Tensor | None = None, ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None, ref_bias: Tensor | None = None, ignore_index: int = -100,
    segment_ids: Tensor | None = None, dtype: torch.dtype | None = torch.float64, **loss_kwargs,
) -> DPOOutput:
    """Naive `linear_dpo_loss`: materialises the full logits `hidden @ weight.T + bias`."""
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = _linear_logits(ref_hidden, weight if ref_weight is None else ref_weight, ref_bias, dtype)
            ref_logps, _ = _logps_and_lengths(ref_logits, labels, segment_ids, ignore_index, dtype)
        b = ref_logps.shape[0] // 2
        ref_chosen_logps, ref_rejected_logps = ref_logps[:b], ref_logps[b:]
    return fused_dpo_loss(_linear_logits(hidden, weight, bias, dtype), labels, ref_chosen_logps, ref_rejected_logps,
                          ignore_index=ignore_index, segment_ids=segment_ids, dtype=dtype, **loss_kwargs)
