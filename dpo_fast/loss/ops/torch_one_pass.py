"""One-pass ("materialise a chunk") DPO loss from hidden states, in pure torch.

The recompute schedule (`torch_logps.TorchLinearTokenLogps`) computes every logit tile twice: once
in the forward for the log-sum-exp, once in the backward for `softmax`. This schedule computes each
tile once (6·N·H·V flops instead of 8) by finishing the gradient inside the forward. That works for
pair-separable losses, processed pair by pair (pair i = sequences i and B+i):

1. For each chunk of the pair's scored tokens: logits z = h W^T + b (one [chunk, V] float32 tile),
   lse, target logit, D = onehot - softmax. Right away: dh rows = D W (kept per token, unscaled; with
   float32 gradients only softmax W is stored and the onehot rows W[y] join at step 2), and the
   weight-gradient part D^T h is added to per-pair scratch buffers (M_c, M_r: [V, H]).
2. When the pair is complete, its log-probs are known, hence the per-pair coefficients
   g_c = dL/dlogp_c and g_r = dL/dlogp_r (torch autograd on the [1]-sized pair loss). Then
   dweight += g_c M_c + g_r M_r, the pair's dh rows are scaled by their coefficient.

For losses where g_r is a fixed multiple k of g_c (the loss depends on rho_c - rho_r only: k = -1, or
-len_c / len_r when length-normalised) a single buffer M = M_c + k M_r suffices: the rejected rows of
D are scaled by k before they enter it, and dweight += g_c M.

Memory beyond the inputs: the gradients (dhidden in the input dtype, dweight float32), one or two
[V, H] float32 scratch buffers, one logit tile, and, for bf16/fp16 hidden states, the pair's dh rows in
float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..formulas import LENGTH_NORMALISED, PAIR_SEPARABLE, DPOOutput, LossConfig, loss_from_logps

# Tokens per logit tile: the knob between time and memory. Each tile adds its p^T h into the [V, H]
# scratch buffer, a full read and write of it, so bigger tiles are faster; the tile itself is the
# largest allocation besides the gradients and the scratch. At the CPU benchmark shape (4096 tokens,
# H=512, V=32000, fp32, 1 thread; naive: 3.65 s CPU, 1500 MiB): 128 tokens -> 3.30 s, 154 MiB extra;
# 256 -> 3.15 s, 170 MiB; 64 -> ~20% slower than 128, 149 MiB. With dh written in place and 2-row softmax
# slices (below): 128 -> 0.88x naive, 150.7 MiB; 112 -> 0.95x, 149.2 MiB (time ratios, same run). With no
# tile temporary outliving its tile and consecutive rows as views: 128 -> 0.87x, 149.0 MiB (commit f158e56).
DEFAULT_CHUNK_TOKENS = 128

# Losses that depend on rho_c - rho_r alone, so g_r / g_c is fixed before the pair is seen.
_DELTA_ONLY = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "robust", "exo_pair", "discopop", "simpo"})


def single_buffer_applies(config: LossConfig) -> bool:
    """True when one [V, H] scratch buffer is enough (g_r = k g_c with k known in advance)."""
    return config.loss_type in _DELTA_ONLY and config.nll_weight == 0


def pair_grads(config: LossConfig, logp_c: Tensor, logp_r: Tensor, ref_chosen: Tensor | None,
               ref_rejected: Tensor | None, lengths: Tensor | None, i0: int, i1: int,
               num_pairs: int) -> tuple[Tensor, Tensor]:
    """dL/dlogp_c and dL/dlogp_r of pairs i0..i1 ([i1 - i0] each, torch autograd on their loss), L being
    the mean loss over all num_pairs pairs. logp_c, logp_r: the pairs' [i1 - i0] sequence log-probs."""
    pc = logp_c.detach().reshape(-1).clone().requires_grad_()
    pr = logp_r.detach().reshape(-1).clone().requires_grad_()
    with torch.enable_grad():
        out = loss_from_logps(
            config, pc, pr,
            None if ref_chosen is None else ref_chosen.detach()[i0:i1],
            None if ref_rejected is None else ref_rejected.detach()[i0:i1],
            chosen_lengths=None if lengths is None else lengths[i0:i1],
            rejected_lengths=None if lengths is None else lengths[num_pairs + i0:num_pairs + i1],
        )
        g_c, g_r = torch.autograd.grad(out.losses.sum() / num_pairs, (pc, pr))
    return g_c, g_r


class PairGrouping(NamedTuple):
    """The scored tokens of a batch in pair order (pair i's chosen response, then its rejected one)."""

    order: Tensor  # [scored] token indices in that order
    offsets: list[int]  # offsets[2i] .. offsets[2i+1]: pair i's chosen tokens; .. offsets[2i+2]: its rejected
    sequence_of: Tensor  # [scored] 2i for pair i's chosen tokens, 2i + 1 for its rejected ones, in that order


def _group_by_pair(labels: Tensor, segment_ids: Tensor, ignore_index: int, num_pairs: int) -> PairGrouping:
    """Scored token indices ordered by (pair, chosen before rejected), the offsets of each group, and each
    token's group."""
    scored = (labels != ignore_index).nonzero().squeeze(-1)
    seg = segment_ids[scored]
    key = (seg % num_pairs) * 2 + (seg >= num_pairs).long()
    key_sorted, perm = torch.sort(key, stable=True)
    counts = torch.bincount(key_sorted, minlength=2 * num_pairs)
    offsets = [0] + torch.cumsum(counts, 0).tolist()  # the one host sync
    return PairGrouping(scored[perm], offsets, key_sorted)


class _OrderedRows:
    """Rows of [N, ...] tensors taken in the order `order`, as views wherever a range of it is consecutive.

    The scored tokens of one sequence are consecutive rows of the compacted hidden states, so almost every
    tile is a view: no [chunk, H] gather of its hidden rows, and its dh rows are written in place instead of
    through a temporary. At the CPU benchmark shape (floor: gradients + scratch + one tile = 148.6 MiB),
    `python benchmarks/bench_loss.py --threads 1` measured 150.7 MiB before this session's changes (these
    views, the deferred onehot part of dh, no tile temporary kept across tiles) and 149.0 MiB after.
    """

    def __init__(self, order: Tensor):
        self.order = order
        host = order.cpu()
        n = host.numel()
        breaks = torch.ones(n, dtype=torch.bool)
        breaks[1:] = host[1:] != host[:-1] + 1
        positions = torch.arange(n)
        # run_start[t]: where the run of consecutive rows holding position t begins.
        self.run_start = torch.cummax(torch.where(breaks, positions, 0), 0).values if n else positions
        self.host = host

    def span(self, s: int, e: int) -> slice | None:
        """The rows of positions s..e as a slice when they are consecutive, else None."""
        if e > s and int(self.run_start[e - 1]) <= s:
            first = int(self.host[s])
            return slice(first, first + e - s)
        return None

    def take(self, x: Tensor, s: int, e: int, span: slice | None) -> Tensor:
        return x[span] if span is not None else x[self.order[s:e]]


def _logit_tile(h: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype) -> Tensor:
    # The matmul runs in the input dtype (what a bf16 model's lm_head does), the softmax in float32.
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    return z.to(acc)


# Rows of the tile processed at a time by the softmax: 2 rows of V=32000 float32 are 250 KB, so the
# logsumexp (which allocates a temporary the size of its input), the subtraction and the exp all run
# on data still in the core's cache, and the tile crosses memory once (read, then written back).
# 8 rows measured the same time at the benchmark shape and 0.5 MiB more peak memory.
_SOFTMAX_ROWS = 2


def _softmax_stats_(z: Tensor, y: Tensor) -> Tensor:
    """Turns the tile z into softmax in place (no second tile) and returns the token log-probs."""
    target = z.gather(1, y.unsqueeze(1)).squeeze(1)
    lse = torch.empty_like(target)
    for r in range(0, z.shape[0], _SOFTMAX_ROWS):
        rows = z[r:r + _SOFTMAX_ROWS]
        torch.logsumexp(rows, 1, out=lse[r:r + _SOFTMAX_ROWS])
        rows.sub_(lse[r:r + _SOFTMAX_ROWS].unsqueeze(1)).exp_()
    return target - lse


def _sequence_logps_only(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         segment_ids: Tensor, ignore_index: int, num_sequences: int, chunk: int,
                         acc: torch.dtype) -> Tensor:
    scored = (labels != ignore_index).nonzero().squeeze(-1)
    out = torch.zeros(num_sequences, dtype=acc, device=hidden.device)
    for s in range(0, scored.numel(), chunk):
        rows = scored[s:s + chunk]
        z = _logit_tile(hidden[rows], weight, bias, acc)
        tok = _softmax_stats_(z, labels[rows])
        out.index_add_(0, segment_ids[rows], tok)
    return out


class TorchOnePassLinearDPO(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None) -> (loss, [2B] sequence log-probs).

    The forward finishes the gradients; the backward only scales them by grad_output.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, segment_ids: Tensor,
                num_sequences: int, ignore_index: int, config: LossConfig, ref_chosen: Tensor | None,
                ref_rejected: Tensor | None, lengths: Tensor | None, grad_enabled: bool, chunk: int,
                single_buffer: bool):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        b = num_sequences // 2
        # needs_input_grad says which inputs require grad even under torch.no_grad, hence grad_enabled.
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        if not (need_h or need_w or need_b):
            seq = _sequence_logps_only(hidden, weight, bias, labels, segment_ids, ignore_index, num_sequences,
                                       chunk, acc)
            loss = _batch_loss(config, seq, b, ref_chosen, ref_rejected, lengths)
            ctx.mark_non_differentiable(seq)
            ctx.grads = (None, None, None)
            return loss, seq

        device = hidden.device
        order, offsets, _ = _group_by_pair(labels, segment_ids, ignore_index, b)
        rows_of = _OrderedRows(order)
        w_acc = weight if weight.dtype == acc else None  # a float32 copy of a bf16 weight is avoided
        dhidden = torch.zeros_like(hidden) if need_h else None
        dweight = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
        dbias = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_b else None
        n_buffers = 0 if not need_w else (1 if single_buffer else 2)
        scratch = [torch.empty(weight.shape, dtype=acc, device=device) for _ in range(n_buffers)]
        bias_scratch = torch.zeros(2, weight.shape[0], dtype=acc, device=device) if need_b else None
        seq = torch.zeros(num_sequences, dtype=acc, device=device)
        length_normalised = config.loss_type in LENGTH_NORMALISED

        for i in range(b):
            start, mid, end = offsets[2 * i], offsets[2 * i + 1], offsets[2 * i + 2]
            # Scale of the rejected rows in the single buffer: g_r = k g_c.
            k = -1.0
            if single_buffer and length_normalised and mid > start and end > mid:
                k = -(mid - start) / (end - mid)
            # Unscaled dh rows of the pair: written straight into dhidden when it is float32 (scaled in place
            # once the pair's coefficients are known), else kept in a float32 buffer of the pair's size.
            in_place = need_h and dhidden.dtype == acc and w_acc is not None
            dh_pair = torch.empty(end - start, hidden.shape[1], dtype=acc, device=device) \
                if need_h and not in_place else None
            fresh = [True] * n_buffers  # the first addmm into a buffer overwrites it: no zeroing pass
            if need_b:
                bias_scratch.zero_()
            logp = torch.zeros(2, dtype=acc, device=device)
            for s in range(start, end, chunk):
                e = min(s + chunk, end)
                span = rows_of.span(s, e)
                h = rows_of.take(hidden, s, e, span)
                y = rows_of.take(labels, s, e, span)
                p = _logit_tile(h, weight, bias, acc)
                tok = _softmax_stats_(p, y)
                n_c = max(0, min(e, mid) - s)  # the first n_c rows of the tile are chosen tokens
                logp[0] += tok[:n_c].sum()
                logp[1] += tok[n_c:].sum()
                # D = onehot - p is never formed: each product is (onehot part) - (p part).
                if in_place:  # P W for now; the onehot part W[y] joins when the pair is scaled (no gather here)
                    if span is not None:
                        torch.mm(p, w_acc, out=dhidden[span])
                    else:
                        dhidden.index_copy_(0, order[s:e], p @ w_acc)
                elif need_h:
                    dh_rows = dh_pair[s - start:e - start]
                    if w_acc is not None:
                        torch.addmm(w_acc[y], p, w_acc, alpha=-1, out=dh_rows)
                    else:  # a bf16 weight: p @ W in its dtype rather than a float32 copy of W
                        dh_rows.copy_(weight[y]).sub_(p.to(weight.dtype) @ weight)
                if need_w or need_b:
                    h_acc = h.to(acc)
                    # (buffer, first row, end row, scale): chosen rows enter with 1, rejected with k or 1.
                    if single_buffer:
                        parts = [(0, 0, n_c, 1.0), (0, n_c, e - s, k)]
                    else:
                        parts = [(0, 0, n_c, 1.0), (1, n_c, e - s, 1.0)]
                    for j, r0, r1, scale in parts:
                        if r1 == r0:
                            continue
                        if need_w:
                            m = scratch[j]
                            m.addmm_(p[r0:r1].T, h_acc[r0:r1], beta=0.0 if fresh[j] else 1.0, alpha=-scale)
                            m.index_add_(0, y[r0:r1], h_acc[r0:r1], alpha=scale)
                            fresh[j] = False
                        if need_b:
                            bias_scratch[j].sub_(p[r0:r1].sum(0), alpha=scale)
                            ones = torch.ones(r1 - r0, dtype=acc, device=device)
                            bias_scratch[j].index_add_(0, y[r0:r1], ones, alpha=scale)
                # Dropped before the next tile is allocated: a loop variable would otherwise keep this tile's
                # gathered rows alive next to the next tile's.
                del p, h, tok
                if need_w or need_b:
                    del h_acc

            seq[i], seq[b + i] = logp[0], logp[1]
            g_c, g_r = pair_grads(config, logp[:1], logp[1:], ref_chosen, ref_rejected, lengths, i, i + 1, b)
            g_c, g_r = g_c[0], g_r[0]
            if need_w:
                for j, g in enumerate((g_c,) if single_buffer else (g_c, g_r)):
                    if not fresh[j]:
                        dweight.addcmul_(scratch[j], g)
            if need_b:
                dbias.addcmul_(bias_scratch[0], g_c)
                if not single_buffer:
                    dbias.addcmul_(bias_scratch[1], g_r)
            if need_h:
                _scale_dh_rows_(dhidden, dh_pair, rows_of, labels, w_acc, start, mid, end, g_c, g_r, chunk)
            dh_pair = None

        loss = _batch_loss(config, seq, b, ref_chosen, ref_rejected, lengths)
        ctx.mark_non_differentiable(seq)
        ctx.grads = (dhidden, dweight, dbias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss, seq

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_seq: Tensor | None):
        return (*hand_over_grads(ctx, grad_loss), None, None, None, None, None, None, None, None, None, None, None)


def hand_over_grads(ctx, grad_loss: Tensor) -> list[Tensor | None]:
    """The gradients a one-pass forward left in ctx.grads (hidden, weight, bias), scaled by grad_loss."""
    if ctx.grads is None:
        raise RuntimeError("backward ran twice through the one-pass DPO loss: its gradients are computed in the "
                           "forward and handed over once (retain_graph=True is not supported); call the loss again")
    # A Python float: a bf16 gradient is then scaled in float32 and rounded once (a loss divided by 3 for
    # gradient accumulation would otherwise carry the scale's own bf16 rounding, ~0.2%). One host sync.
    scale = float(grad_loss)
    grads = []
    for g, dtype in zip(ctx.grads, ctx.dtypes):
        # In place: these buffers are ours and handed over once, so no second [V, H] copy of dweight.
        if g is not None and scale != 1.0:
            g.mul_(scale)
        grads.append(None if g is None else g.to(dtype))
    # Freed now: a caller keeping `loss` alive for logging would otherwise keep them until the next step.
    ctx.grads = None
    return grads


def _scale_dh_rows_(dhidden: Tensor, dh_pair: Tensor | None, rows_of: _OrderedRows, labels: Tensor,
                    w_acc: Tensor | None, start: int, mid: int, end: int, g_c: Tensor, g_r: Tensor,
                    chunk: int) -> None:
    """Writes a pair's final dh rows once its coefficients are known, `chunk` rows at a time (temporaries
    of [chunk, H], never of the pair's size).

    dh_pair None: dhidden already holds P W on those rows, and dh = g (W[y] - P W) is finished in place.
    Otherwise dh_pair holds the unscaled float32 rows (W[y] - P W) and is scaled into dhidden's dtype.
    """
    for first, last, g in ((start, mid, g_c), (mid, end, g_r)):
        for s in range(first, last, chunk):
            e = min(s + chunk, last)
            span = rows_of.span(s, e)
            if dh_pair is None:
                y = rows_of.take(labels, s, e, span)
                rows = dhidden[span] if span is not None else dhidden[rows_of.order[s:e]]
                rows.sub_(w_acc[y]).mul_(-g)
            else:
                rows = (dh_pair[s - start:e - start] * g).to(dhidden.dtype)
            if span is None:
                dhidden.index_copy_(0, rows_of.order[s:e], rows)
            elif dh_pair is not None:
                dhidden[span].copy_(rows)


def _batch_loss(config: LossConfig, seq: Tensor, b: int, ref_chosen, ref_rejected, lengths) -> Tensor:
    out = loss_from_logps(
        config, seq[:b], seq[b:], ref_chosen, ref_rejected,
        chosen_lengths=None if lengths is None else lengths[:b],
        rejected_lengths=None if lengths is None else lengths[b:],
    )
    return out.loss.detach()


def linear_dpo_loss_one_pass(config: LossConfig, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                             labels: Tensor, segment_ids: Tensor, num_sequences: int, ignore_index: int,
                             ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
                             lengths: Tensor | None, *, chunk: int = DEFAULT_CHUNK_TOKENS,
                             single_buffer: bool | None = None):
    """DPO loss of pair-separable losses with the one-pass schedule; returns a `DPOOutput`.

    hidden [N, H]; labels, segment_ids [N] (packed form, ignore_index where not scored); sequences
    0..B-1 chosen, B..2B-1 rejected. `lengths` [2B] scored-token counts (needed by the length-normalised
    losses and nll_weight). `single_buffer=None` uses one scratch buffer wherever it applies.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    check_pair_inputs(config, num_sequences // 2, ref_chosen_logps, ref_rejected_logps, lengths, hidden.device)
    if single_buffer is None:
        single_buffer = single_buffer_applies(config)
    elif single_buffer and not single_buffer_applies(config):
        raise ValueError(f"single_buffer=True needs a loss of rho_c - rho_r alone and nll_weight=0, got "
                         f"loss_type={config.loss_type!r}, nll_weight={config.nll_weight}")
    loss, seq = TorchOnePassLinearDPO.apply(
        hidden, weight, bias, labels, segment_ids, num_sequences, ignore_index, config,
        ref_chosen_logps, ref_rejected_logps, lengths, torch.is_grad_enabled(), chunk, single_buffer,
    )
    return one_pass_output(config, loss, seq, ref_chosen_logps, ref_rejected_logps, lengths)


def check_pair_inputs(config: LossConfig, num_pairs: int, ref_chosen_logps: Tensor | None,
                      ref_rejected_logps: Tensor | None, lengths: Tensor | None, device: torch.device) -> None:
    """Validates the pair-level inputs once, up front, with the batch's row numbers in the messages (the
    per-pair or per-group loss calls of a one-pass schedule would otherwise report row 0)."""
    if config.loss_type not in PAIR_SEPARABLE:
        raise ValueError(f"loss_type={config.loss_type!r} is not pair-separable; the one-pass schedule needs "
                         f"one of {', '.join(sorted(PAIR_SEPARABLE))}")
    zeros = torch.zeros(num_pairs, dtype=torch.float32, device=device)
    _batch_loss(config, torch.cat([zeros, zeros]), num_pairs, ref_chosen_logps, ref_rejected_logps, lengths)


def one_pass_output(config: LossConfig, loss: Tensor, seq: Tensor, ref_chosen_logps: Tensor | None,
                    ref_rejected_logps: Tensor | None, lengths: Tensor | None) -> DPOOutput:
    """The `DPOOutput` of a one-pass schedule from its loss and [2B] sequence log-probs."""
    b = seq.shape[0] // 2
    out = loss_from_logps(
        config, seq[:b], seq[b:], ref_chosen_logps, ref_rejected_logps,
        chosen_lengths=None if lengths is None else lengths[:b],
        rejected_lengths=None if lengths is None else lengths[b:],
    )
    return DPOOutput(
        loss=loss,
        losses=out.losses.detach(),
        chosen_logps=seq[:b],
        rejected_logps=seq[b:],
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
    )
