"""Public functional API: sequence log-probs and DPO losses from logits or from hidden states.

Every function reduces its input to the packed form `[N, V]` (or `[N, H]`) with one segment id per
token (a free view for the padded form), computes token log-probs with the chosen backend, sums them
per sequence, and hands the `[B]` vectors to the pair-level formulas of `dpo_fast.loss.formulas`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .formulas import DPOOutput, LossConfig, loss_from_logps
from .validation import check_float, check_labels, check_ref, check_segment_ids, resolve_backend


def _padded_segments(labels: Tensor, ignore_index: int) -> Tensor:
    """[R, T] labels -> [R*T] segment ids: the row index, or -1 where the label is ignored."""
    rows = torch.arange(labels.shape[0], device=labels.device).repeat_interleave(labels.shape[1])
    return torch.where(labels.reshape(-1) != ignore_index, rows, -1)


def _segment_sums(token_values: Tensor, segment_ids: Tensor, num_sequences: int) -> Tensor:
    """Sum `token_values` per segment; tokens with segment -1 are dropped (through a spill slot)."""
    slot = torch.where(segment_ids >= 0, segment_ids, num_sequences).long()
    sums = torch.zeros(num_sequences + 1, dtype=token_values.dtype, device=token_values.device)
    return sums.index_add(0, slot, token_values)[:num_sequences]


class _Flat:
    """An input brought to the packed form: [N, D] values, [N] labels (ignored where not scored), [N] segments."""

    def __init__(self, values: Tensor, labels: Tensor, segment_ids: Tensor | None, ignore_index: int,
                 name: str, *, vocab_size: int | None = None, paired: bool = True):
        """vocab_size: the label range; None means the last dimension of `values` (logits)."""
        check_float(name, values)
        vocab = values.shape[-1] if vocab_size is None else vocab_size
        if segment_ids is None:
            if values.dim() != 3:
                raise ValueError(f"{name} must have shape [2B, T, D] (padded) or [N, D] with segment_ids (packed), "
                                 f"got {list(values.shape)}")
            rows, t = values.shape[:2]
            check_labels("labels", labels, (rows, t), vocab, ignore_index, values.device)
            self.num_sequences = rows
            self.segment_ids = _padded_segments(labels, ignore_index)
        else:
            if values.dim() != 2:
                raise ValueError(f"{name} must have shape [N, D] when segment_ids is given (packed form), "
                                 f"got {list(values.shape)}")
            check_labels("labels", labels, (values.shape[0],), vocab, ignore_index, values.device)
            self.num_sequences = check_segment_ids(segment_ids, values.shape[0], values.device, paired=paired)
            self.segment_ids = segment_ids.long()
        self.values = values.reshape(-1, values.shape[-1])
        flat_labels = labels.reshape(-1).long()
        # Tokens outside any sequence are not scored, whatever their label says.
        self.labels = torch.where(self.segment_ids >= 0, flat_labels, ignore_index)
        self.ignore_index = ignore_index

    def sequence_sums(self, token_values: Tensor) -> Tensor:
        return _segment_sums(token_values, self.segment_ids, self.num_sequences)

    def lengths(self) -> Tensor:
        scored = (self.labels != self.ignore_index).to(torch.long)
        return _segment_sums(scored, self.segment_ids, self.num_sequences)


class _FlatHidden(_Flat):
    """Hidden states in the packed form, keeping only the scored tokens.

    Unscored tokens (prompts, padding) would cost a full row of the vocabulary matmul each for nothing:
    with hh-rlhf-like prompts (4:1 prompt:completion) that is most of the work. Gathering the scored
    rows copies [scored, H], which is small beside a [scored, V] logit tile.
    """

    def __init__(self, hidden, labels, segment_ids, ignore_index, vocab_size, name="hidden", paired=True):
        super().__init__(hidden, labels, segment_ids, ignore_index, name, vocab_size=vocab_size, paired=paired)
        scored = self.labels != ignore_index
        self.rows = None
        if not bool(scored.all()):
            self.rows = scored.nonzero().squeeze(-1)
            self.values = self.values.index_select(0, self.rows)
            self.labels = self.labels[self.rows]
            self.segment_ids = self.segment_ids[self.rows]

    def select(self, other: Tensor) -> Tensor:
        """The same scored rows of another [.., H] tensor laid out like the input (e.g. ref_hidden)."""
        other = other.reshape(-1, other.shape[-1])
        return other if self.rows is None else other.index_select(0, self.rows)


def sequence_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, average: bool = False,
                   backend: str = "auto") -> Tensor:
    """Per-row sum (or per-token mean with `average=True`) of log_softmax(logits)[t, labels[t]].

    Args:
        logits: [R, T, V] float32/bfloat16/float16.
        labels: [R, T] int, aligned with the logits (label t is the token logits t predicts; no shift).
    Returns:
        [R] float32. A row with no scored token gives 0.
    """
    flat = _Flat(logits, labels, None, ignore_index, "logits")
    tok = ops.token_logps(flat.values, flat.labels, ignore_index=ignore_index,
                          backend=resolve_backend(backend, logits.device))
    total = flat.sequence_sums(tok)
    if average:
        return total / flat.lengths().clamp(min=1).to(total.dtype)
    return total


def linear_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          ignore_index: int = -100, segment_ids: Tensor | None = None,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-sequence log-probs of `hidden @ weight.T + bias` without materialising the logits.

    hidden: [R, T, H] with labels [R, T] (one sequence per row), or packed [N, H] with labels [N] and
    segment_ids [N] (-1 = not scored; sequences 0..S-1, S = max id + 1).
    Returns ([S] float32 summed log-probs, differentiable; [S] int64 scored-token counts).
    """
    _check_linear(hidden, weight, bias)
    flat = _FlatHidden(hidden, labels, segment_ids, ignore_index, weight.shape[0], paired=False)
    tok = ops.linear_token_logps(flat.values, weight, flat.labels, bias=bias, ignore_index=ignore_index,
                                 backend=resolve_backend(backend, hidden.device))
    return flat.sequence_sums(tok), flat.lengths()


def _check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[-1]}] (vocab x hidden), got {list(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}: pass both in the lm_head's dtype "
                        "(under autocast, cast the hidden states to it)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")


def _finish(config: LossConfig, flat: _Flat, seq_logps: Tensor, ref_chosen_logps, ref_rejected_logps) -> DPOOutput:
    b = flat.num_sequences // 2
    check_ref("ref_chosen_logps", ref_chosen_logps, b, seq_logps.device)
    check_ref("ref_rejected_logps", ref_rejected_logps, b, seq_logps.device)
    lengths = flat.lengths() if config.needs_lengths else None
    return loss_from_logps(
        config, seq_logps[:b], seq_logps[b:], ref_chosen_logps, ref_rejected_logps,
        chosen_lengths=None if lengths is None else lengths[:b],
        rejected_lengths=None if lengths is None else lengths[b:],
    )


def _check_pairs(flat: _Flat, name: str) -> None:
    if flat.num_sequences == 0 or flat.num_sequences % 2:
        raise ValueError(f"{name} must hold 2B rows (B chosen then B rejected), got {flat.num_sequences} rows")


def fused_dpo_loss(
    logits: Tensor, labels: Tensor, ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, nll_weight: float = 0.0, simpo_gamma: float = 0.0, discopop_tau: float = 0.05,
    ignore_index: int = -100, segment_ids: Tensor | None = None, backend: str = "auto",
) -> DPOOutput:
    """DPO loss straight from logits, without a float32 copy of them.

    Padded form: logits [2B, T, V], labels [2B, T]; rows [:B] chosen, rows [B:] rejected.
    Packed form: logits [N, V], labels [N], segment_ids [N] (-1 = not scored); sequences 0..B-1 are
    the chosen ones and B..2B-1 the rejected ones, pair i = (i, B+i).
    Lengths for the length-normalised losses are the scored-token counts from the labels.
    """
    config = LossConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, nll_weight=nll_weight,
                        simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)
    flat = _Flat(logits, labels, segment_ids, ignore_index, "logits")
    _check_pairs(flat, "logits")
    tok = ops.token_logps(flat.values, flat.labels, ignore_index=ignore_index,
                          backend=resolve_backend(backend, logits.device))
    return _finish(config, flat, flat.sequence_sums(tok), ref_chosen_logps, ref_rejected_logps)


def linear_dpo_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None, *, bias: Tensor | None = None, ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None, ref_bias: Tensor | None = None, beta: float = 0.1,
    loss_type: str = "sigmoid", label_smoothing: float = 0.0, nll_weight: float = 0.0, simpo_gamma: float = 0.0,
    discopop_tau: float = 0.05, ignore_index: int = -100, segment_ids: Tensor | None = None,
    backend: str = "auto",
) -> DPOOutput:
    """DPO loss from the last hidden states and the lm_head, never materialising [tokens, V] logits.

    hidden: [2B, T, H] (padded) or [N, H] with segment_ids (packed); weight: [V, H]; bias: [V] or None.
    ref_hidden (+ ref_weight, ref_bias; ref_weight defaults to weight): the reference model's hidden
    states; its log-probs are then computed in the same call, without gradient, instead of being passed
    as ref_chosen_logps / ref_rejected_logps.
    """
    config = LossConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, nll_weight=nll_weight,
                        simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)
    _check_linear(hidden, weight, bias)
    vocab = weight.shape[0]
    flat = _FlatHidden(hidden, labels, segment_ids, ignore_index, vocab)
    _check_pairs(flat, "hidden")
    chosen_backend = resolve_backend(backend, hidden.device)

    if ref_hidden is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
        if tuple(ref_hidden.shape) != tuple(hidden.shape):
            raise ValueError(
                f"ref_hidden must have the shape of hidden {list(hidden.shape)}, got {list(ref_hidden.shape)}")
        rw = weight if ref_weight is None else ref_weight
        if tuple(rw.shape) != tuple(weight.shape):
            raise ValueError(f"ref_weight must have shape {list(weight.shape)}, got {list(rw.shape)}")
        with torch.no_grad():
            ref_tok = ops.linear_token_logps(flat.select(ref_hidden), rw, flat.labels,
                                             bias=ref_bias, ignore_index=ignore_index, backend=chosen_backend)
            ref_seq = flat.sequence_sums(ref_tok)
        b = flat.num_sequences // 2
        ref_chosen_logps, ref_rejected_logps = ref_seq[:b], ref_seq[b:]

    one_pass = ops.linear_dpo_loss_one_pass(config, flat, weight, bias, ref_chosen_logps, ref_rejected_logps,
                                            backend=chosen_backend)
    if one_pass is not None:
        return one_pass
    tok = ops.linear_token_logps(flat.values, weight, flat.labels, bias=bias, ignore_index=ignore_index,
                                 backend=chosen_backend)
    return _finish(config, flat, flat.sequence_sums(tok), ref_chosen_logps, ref_rejected_logps)
