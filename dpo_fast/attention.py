"""Attention masks for the batch layouts of `dpo_fast.layouts`, in the forms attention kernels take.

One rule covers the three layouts (the drawing is in `dpo_fast.layouts`): query q may attend to key k
of the same row when

* k is not after q, and both belong to the same document (pair), not padding;
* pos[k] <= pos[q], and no token between k and q (q included) of that document holds pos[k] again:
  the query reads, for each position up to its own, the most recent token holding it. A sequence
  restarting at position 0 (packed) or a rejected branch restarting after the prompt (prefix_shared)
  thereby hides what came before it at the same positions;
* not (q is a rejected token and k a chosen one): implied by the rule above for well-formed batches,
  kept as the layout's explicit promise.

Padding attends to itself only, so no softmax row is empty (an all-masked row gives NaN in sdpa).

transformers (5.x) and these masks: `create_causal_mask` (masking_utils.py, `_preprocess_mask_arguments`)
returns a 4D `attention_mask` tensor or a `BlockMask` as is, before it looks at `position_ids`, so its
packed-sequence detection (which would rebuild a block-causal mask from position resets) never runs and
cannot override ours; the eager attention adds the float mask to the scores and sdpa receives it as
`attn_mask` with `is_causal=False`. Layers with a sliding window get the same mask: the window is not
applied (`dpo_fast.scoring` refuses sequences longer than the window).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pairs import ROLE_CHOSEN, ROLE_REJECTED, Batch


def _next_same_position(document_ids: Tensor, position_ids: Tensor) -> Tensor:
    """[R, L] -> [R, L]: the column of the next token in the row with the same document and position (L if none)."""
    length = document_ids.shape[1]
    cols = torch.arange(length, device=document_ids.device)
    same = (document_ids.unsqueeze(2) == document_ids.unsqueeze(1)) & \
        (position_ids.unsqueeze(2) == position_ids.unsqueeze(1)) & (cols.view(1, 1, -1) > cols.view(1, -1, 1))
    return torch.where(same, cols.view(1, 1, -1), length).amin(-1)


def allowed_pairs(batch: Batch) -> Tensor:
    """[R, L, L] bool: [r, q, k] is True where query q may attend to key k (the rule of the module docstring)."""
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


def attention_mask_4d(batch: Batch, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """[R, 1, L, L] additive mask for eager/sdpa attention: 0 where allowed, the dtype's minimum elsewhere.

    Pass it as `attention_mask` to a transformers model, together with `batch.position_ids`.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype (the model's activations), got {dtype}")
    allowed = allowed_pairs(batch).unsqueeze(1)
    if device is not None:
        allowed = allowed.to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def flex_block_mask(batch: Batch, device: torch.device | str | None = None, *, block_size: int = 128):
    """A FlexAttention `BlockMask` for `batch` (same rule as `attention_mask_4d`), built without an [L, L] mask.

    Needs torch >= 2.5. Works on any device `create_block_mask` supports; FlexAttention itself wants CUDA
    (or a compiler on the CPU). Pass it as `attention_mask` to a model loaded with
    attn_implementation="flex_attention".
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = batch.input_ids.device if device is None else torch.device(device)
    doc, pos, role = (t.to(device) for t in (batch.document_ids, batch.position_ids, batch.roles))
    next_same = _next_same_position(doc, pos)
    mask_mod = block_mask_mod(doc, pos, role, next_same)
    rows, length = doc.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=device,
                             BLOCK_SIZE=block_size)


def block_mask_mod(document_ids: Tensor, position_ids: Tensor, roles: Tensor, next_same: Tensor):
    """The FlexAttention `mask_mod(b, h, q, kv)` of the rule, over [R, L] tensors (next_same: `_next_same_position`)."""

    def mask_mod(b, h, q, kv):
        doc_q, doc_k = document_ids[b, q], document_ids[b, kv]
        visible = (kv <= q) & (doc_q == doc_k) & (doc_q >= 0)
        visible = visible & (position_ids[b, kv] <= position_ids[b, q]) & (q < next_same[b, kv])
        visible = visible & ~((roles[b, q] == ROLE_REJECTED) & (roles[b, kv] == ROLE_CHOSEN))
        return visible | (q == kv)

    return mask_mod


def varlen_cu_seqlens(batch: Batch) -> tuple[Tensor, int]:
    """flash-attention varlen boundaries for a "padded" or "packed" batch, over its R*L tokens flattened.

    Returns (cu_seqlens int32 [S+1], max_seqlen): a sequence starts at each position id 0 of a real token;
    a row's trailing padding is one extra sequence (computed, never attended to by real tokens, never
    scored). "prefix_shared" cannot be expressed this way (its rejected branch skips part of its
    context), so it raises: use `flex_block_mask` or `attention_mask_4d` there.
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
    Anything else ("eager", "sdpa", None): the additive `attention_mask_4d`. Pass the result with
    `input_ids` and `position_ids`.
    """
    impl = attn_implementation or "eager"
    if impl == "flex_attention":
        return {"attention_mask": flex_block_mask(batch, device)}
    if "flash" in impl:
        if batch.layout == "prefix_shared":
            raise ValueError(f"attn_implementation={impl!r} cannot run the 'prefix_shared' layout (its rejected "
                             "branch skips part of its context); use 'packed', or sdpa/eager/flex_attention")
        cu, longest = varlen_cu_seqlens(batch)
        cu = cu.to(device)
        return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                "max_length_k": longest}
    return {"attention_mask": attention_mask_4d(batch, dtype, device=device)}
