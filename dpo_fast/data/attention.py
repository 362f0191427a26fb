"""Attention for the batch layouts of `dpo_fast.data.layouts`: the mask rule, its forms, and the model inputs.

One rule covers the three layouts (the drawing is in `dpo_fast.data.layouts`): query q may attend to key k
of the same row when

* k is not after q, and both belong to the same document (pair), not padding;
* pos[k] <= pos[q], and no token between k and q (q included) of that document holds pos[k] again:
  the query reads, for each position up to its own, the most recent token holding it. A sequence
  restarting at position 0 (packed) or a rejected branch restarting after the prompt (prefix_shared)
  thereby hides what came before it at the same positions;
* not (q is a rejected token and k a chosen one): implied by the rule above for well-formed batches,
  kept as the layout's explicit promise.

Padding attends to itself only, so no softmax row is empty (an all-masked row gives NaN in sdpa).

`allowed_pairs` writes the rule out literally ([R, L, L], for tests and reading). The model paths use an
equivalent per-key form that needs no pair of positions: in every layout, a document's tokens form
contiguous runs in which position ids rise by one from token to token except where a branch restarts
(a new sequence at 0, the rejected branch at P-1), and a restart never jumps upwards. So the queries that
see key k are exactly the columns k .. visible_until[k] - 1, where visible_until[k] is the first later
column of k's run holding a position <= pos[k] (the restart that hides k, or the next holder of its
position), or the run's end (`key_visible_until`, O(L)). From it:

* FlexAttention (`flex_block_mask`): mask_mod(q, k) = k <= q < visible_until[k], and the block tables
  from per-block minima and maxima of visible_until: a block of keys is empty for a block of queries
  when no key's interval reaches it, full when every key's interval covers it. Memory O(L + (L/128)^2);
  masked blocks are skipped, and GQA runs without repeating K/V.
* eager / sdpa (`attention_mask_4d`): the dense [R, 1, L, L] additive mask, built on the model's device.
* flash-attention (`varlen_cu_seqlens`): "padded" and "packed" are block-diagonal causal, so the
  flattened rows run as one varlen batch; "prefix_shared" cannot be written that way.

`model_inputs` gives a model what it needs for a batch in the form of its attention implementation, and
`preferred_attention` chooses that implementation: FlexAttention for "packed" and "prefix_shared" on
CUDA when the model's class supports it.

transformers (5.x) and these masks: `create_causal_mask` (masking_utils.py, `_preprocess_mask_arguments`)
returns a 4D `attention_mask` tensor or a `BlockMask` as is, before it looks at `position_ids`, so its
packed-sequence detection (which would rebuild a block-causal mask from position resets) never runs and
cannot override ours; the eager attention adds the float mask to the scores and sdpa receives it as
`attn_mask` with `is_causal=False`. Layers with a sliding window get the same mask: the window is not
applied (`dpo_fast.training.scoring` refuses sequences longer than the window).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .pairs import ROLE_CHOSEN, ROLE_REJECTED, Batch

# FlexAttention's tile: rows on the flex path are padded to a multiple of it (`flex_row_multiple`).
FLEX_BLOCK_SIZE = 128
# Layouts FlexAttention runs by default on CUDA; "padded" rows are plain causal and stay with sdpa.
FLEX_LAYOUTS = ("packed", "prefix_shared")
# Branch restarts looked past per key: a document run holds at most two branches in every layout
# (prompt + chosen and the rejected branch; or, in "packed" with one pair per row, its two sequences).
_RESTARTS_LOOKED_PAST = 2


def _next_same_position(document_ids: Tensor, position_ids: Tensor) -> Tensor:
    """[R, L] -> [R, L]: the column of the next token in the row with the same document and position (L if none).

    One stable sort of (document, position) keys per row: equal keys end up adjacent in column order.
    """
    length = document_ids.shape[1]
    key = ((document_ids + 1) << 32) + position_ids  # documents >= -1, positions < 2**32
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    following = torch.full_like(order, length)
    following[:, :-1] = torch.where(sorted_key[:, 1:] == sorted_key[:, :-1], order[:, 1:], length)
    return torch.empty_like(order).scatter_(1, order, following)


def allowed_pairs(batch: Batch) -> Tensor:
    """[R, L, L] bool: [r, q, k] is True where query q may attend to key k (the rule of the module docstring).

    The literal rule, quadratic in L: for tests and for reading. Models get `model_inputs`.
    """
    doc, pos, role = batch.document_ids, batch.position_ids, batch.roles
    length = doc.shape[1]
    cols = torch.arange(length, device=doc.device)
    q_idx, k_idx = cols.view(1, -1, 1), cols.view(1, 1, -1)
    next_same = _next_same_position(doc, pos).unsqueeze(1)  # indexed by key
    doc_q, doc_k = doc.unsqueeze(2), doc.unsqueeze(1)
    allowed = (k_idx <= q_idx) & (doc_q == doc_k) & (doc_q >= 0)
    allowed &= (pos.unsqueeze(1) <= pos.unsqueeze(2)) & (q_idx < next_same)
    allowed &= ~((role.unsqueeze(2) == ROLE_REJECTED) & (role.unsqueeze(1) == ROLE_CHOSEN))
    return allowed | (q_idx == k_idx)


def _next_flagged(flags: Tensor) -> Tensor:
    """[R, L] bool -> [R, L]: the first column after each column where `flags` is set (L if none)."""
    length = flags.shape[1]
    cols = torch.arange(length, device=flags.device)
    later = F.pad(torch.where(flags, cols, length)[:, 1:], (0, 1), value=length)
    return later.flip(1).cummin(1).values.flip(1)


def key_visible_until(document_ids: Tensor, position_ids: Tensor) -> Tensor:
    """[R, L] -> [R, L]: query q may attend to key k exactly when k <= q < visible_until[k] (see the module
    docstring); padding keys are visible to themselves only. O(L) per row, no data-dependent host sync."""
    doc, pos = document_ids, position_ids
    length = doc.shape[1]
    cols = torch.arange(length, device=doc.device).expand_as(doc)
    run_start = doc != F.pad(doc[:, :-1], (1, 0), value=-2)
    restart = run_start | (pos != F.pad(pos[:, :-1], (1, 0), value=-2) + 1)
    run_end = _next_flagged(run_start)
    next_restart = _next_flagged(restart)
    # Inside a branch positions rise by one, so the first later token at a position <= pos[k] is a restart.
    ends = next_restart
    for _ in range(_RESTARTS_LOOKED_PAST):
        at = ends.clamp(max=length - 1)
        passed = (ends < run_end) & (pos.gather(1, at) > pos)
        ends = torch.where(passed, next_restart.gather(1, at), ends)
    return torch.where(doc >= 0, torch.minimum(ends, run_end), cols + 1)


def _visible(visible_until: Tensor, device: torch.device | str | None = None) -> Tensor:
    """[R, L, L] bool from `key_visible_until` (dense: eager/sdpa only)."""
    visible_until = visible_until if device is None else visible_until.to(device, non_blocking=True)
    cols = torch.arange(visible_until.shape[1], device=visible_until.device)
    q_idx, k_idx = cols.view(1, -1, 1), cols.view(1, 1, -1)
    return (k_idx <= q_idx) & (q_idx < visible_until.unsqueeze(1))


def attention_mask_4d(batch: Batch, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """[R, 1, L, L] additive mask for eager/sdpa attention: 0 where allowed, the dtype's minimum elsewhere.

    Built on `device` (default: the batch's) from the [R, L] ids. Pass it as `attention_mask` to a
    transformers model, together with `batch.position_ids`.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype (the model's activations), got {dtype}")
    device = batch.document_ids.device if device is None else torch.device(device)
    doc, pos = (t.to(device, non_blocking=True) for t in (batch.document_ids, batch.position_ids))
    allowed = _visible(key_visible_until(doc, pos)).unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def block_mask_mod(visible_until: Tensor):
    """The FlexAttention `mask_mod(b, h, q, kv)` over [R, L] `key_visible_until` values."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q < visible_until[b, kv])

    return mask_mod


def _block_table(flags: Tensor) -> tuple[Tensor, Tensor]:
    """[R, Q, K] bool -> (count [R, 1, Q] int32, indices [R, 1, Q, K] int32 with the flagged blocks first)."""
    count = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return count.unsqueeze(1), order.unsqueeze(1)


def flex_block_mask(batch: Batch, device: torch.device | str | None = None, *, block_size: int = FLEX_BLOCK_SIZE):
    """A FlexAttention `BlockMask` for `batch` (same rule as `attention_mask_4d`), built on `device` from the
    per-token ids: memory O(L + (L / block_size)^2) per row, no [L, L] tensor.

    Needs torch >= 2.5. Pass it as `attention_mask` to a model whose attn_implementation is "flex_attention".
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = batch.input_ids.device if device is None else torch.device(device)
    doc, pos = (t.to(device, non_blocking=True) for t in (batch.document_ids, batch.position_ids))
    until = key_visible_until(doc, pos)
    rows, length = until.shape
    blocks = -(-length // block_size)
    tail = blocks * block_size - length  # columns past the row: they lower no maximum and raise no minimum
    lowest = F.pad(until, (0, tail), value=2 * length).view(rows, blocks, block_size).amin(-1)
    highest = F.pad(until, (0, tail), value=0).view(rows, blocks, block_size).amax(-1)
    index = torch.arange(blocks, device=device)
    q_block, k_block = index.view(1, -1, 1), index.view(1, 1, -1)
    q_start = (index * block_size).view(1, -1, 1)
    q_end = ((index + 1) * block_size).clamp(max=length).view(1, -1, 1)
    # Some key of the block is visible to some query of it / every key to every query.
    reached = (k_block <= q_block) & (highest.unsqueeze(1) > q_start)
    full = (k_block < q_block) & (lowest.unsqueeze(1) >= q_end)
    partial_count, partial_index = _block_table(reached & ~full)
    full_count, full_index = _block_table(full)
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=block_size,
                                    mask_mod=block_mask_mod(until), seq_lengths=(length, length))


def varlen_cu_seqlens(batch: Batch) -> tuple[Tensor, int]:
    """flash-attention varlen boundaries for a "padded" or "packed" batch, over its R*L tokens flattened.

    Returns (cu_seqlens int32 [S+1], max_seqlen), on the batch's device (compute it on the host): a
    sequence starts at each position id 0 of a real token; a row's trailing padding is one extra sequence
    (computed, never attended to by real tokens, never scored). "prefix_shared" cannot be expressed this
    way (its rejected branch skips part of its context), so it raises: use `flex_block_mask` or
    `attention_mask_4d` there.
    """
    if batch.layout == "prefix_shared":
        raise ValueError("varlen_cu_seqlens: the 'prefix_shared' layout is not block-diagonal causal; "
                         "use flex_block_mask or attention_mask_4d")
    rows, length = batch.input_ids.shape
    real = batch.document_ids >= 0
    starts = real & (batch.position_ids == 0)
    padding_start = ~real
    padding_start[:, 1:] &= real[:, :-1]
    starts = starts | padding_start
    starts[:, 0] = True
    flat_starts = starts.reshape(-1).nonzero().squeeze(-1)
    total = torch.tensor([rows * length], device=flat_starts.device)
    cu = torch.cat([flat_starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attention_kwargs(batch: Batch, attn_implementation: str | None, dtype: torch.dtype,
                     device: torch.device | str) -> dict:
    """The attention keywords a transformers backbone needs for `batch`, by attention implementation.

    "flex_attention": a `BlockMask` (`flex_block_mask`). "flash_attention_*" (and kernels-hub flash
    variants): no mask, the varlen boundaries `cu_seq_lens_q/k`, `max_length_q/k` of `varlen_cu_seqlens`
    (transformers then runs the flattened R*L tokens as one varlen batch); "prefix_shared" raises there.
    Anything else ("eager", "sdpa", None): the additive `attention_mask_4d`. Everything is built on
    `device` from the batch's [R, L] ids (the varlen boundaries on the host, a few numbers).
    """
    impl = attn_implementation or "eager"
    if impl == "flex_attention":
        return {"attention_mask": flex_block_mask(batch, device)}
    if "flash" in impl:
        if batch.layout == "prefix_shared":
            raise ValueError(f"attn_implementation={impl!r} cannot run the 'prefix_shared' layout (its rejected "
                             "branch skips part of its context); use 'packed', or sdpa/eager/flex_attention")
        cu, longest = varlen_cu_seqlens(batch)
        if torch.device(device).type == "cuda":
            cu = cu.pin_memory()  # a copy from pageable memory would wait for the device
        cu = cu.to(device, non_blocking=True)
        return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                "max_length_k": longest}
    return {"attention_mask": attention_mask_4d(batch, dtype, device=device)}


# ------------------------------------------------------------------------------------------------
# Choosing the implementation and feeding the model


def attention_implementation(model) -> str:
    """The attn_implementation a transformers model runs now ("eager" when it does not say)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def preferred_attention(model, layout: str, device: torch.device | str) -> str:
    """The attn_implementation to run `layout` with on `device`.

    FlexAttention for "packed" and "prefix_shared" on CUDA when the model's class declares support
    (`_supports_flex_attn`): its `BlockMask` skips masked blocks and needs no [L, L] mask, and it runs GQA
    without repeating K/V. A flash-attention model keeps flash (varlen boundaries; "prefix_shared" falls
    back to "packed" in the trainer). Anything else keeps the model's own implementation (dense mask).
    """
    impl = attention_implementation(model)
    if "flash" in impl or layout not in FLEX_LAYOUTS or torch.device(device).type != "cuda":
        return impl
    return "flex_attention" if getattr(model, "_supports_flex_attn", False) else impl


def set_attention(model, attn_implementation: str) -> None:
    """Switch a transformers model (and its sub-models) to another attention implementation."""
    if attention_implementation(model) == attn_implementation:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:
        model.config._attn_implementation = attn_implementation


@contextlib.contextmanager
def attention_for(model, layout: str, device: torch.device | str):
    """Run `model` with `preferred_attention` inside the block, and restore its own implementation after."""
    before = attention_implementation(model)
    set_attention(model, preferred_attention(model, layout, device))
    try:
        yield
    finally:
        set_attention(model, before)


def row_multiple(attn_implementation: str) -> int:
    """Rows are padded to a multiple of this: FlexAttention's tile on the flex path, 1 elsewhere."""
    return FLEX_BLOCK_SIZE if attn_implementation == "flex_attention" else 1


def uses_dense_mask(attn_implementation: str) -> bool:
    """True when the implementation takes the [R, 1, L, L] mask (rows then stay short: it costs R * L^2)."""
    return attn_implementation != "flex_attention" and "flash" not in attn_implementation


def model_inputs(model, batch: Batch, device: torch.device | str, *,
                 dtype: torch.dtype | None = None) -> dict[str, Any]:
    """input_ids, position_ids and the attention keywords of `model`'s implementation for `batch`, on `device`.

    The [R, L] ids are copied without blocking the host (from pinned memory when the batch is pinned,
    `Batch.pin_memory`) and the mask is built on the device: a `BlockMask` for FlexAttention, the dense
    [R, 1, L, L] mask for eager/sdpa (in `dtype`, default the model's), varlen boundaries for flash.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    return {"input_ids": batch.input_ids.to(device, non_blocking=True),
            "position_ids": batch.position_ids.to(device, non_blocking=True),
            **attention_kwargs(batch, attention_implementation(model), dtype, device)}
