"""Per-pair sequence log-probs of a causal LM, through a layout and the fused head (no [tokens, V] logits).

`pair_logps` is what precomputes reference log-probs or scores a preference set: it groups pairs into
batches under a token budget, lays each batch out (`dpo_fast.data.layouts`), runs the model's backbone to its
last hidden states with the layout's attention mask and position ids (`dpo_fast.data.attention.model_inputs`),
and scores only the labelled positions with `dpo_fast.loss.ops.linear_token_logps`, one vocabulary tile at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data.attention import attention_for, attention_implementation, model_inputs, row_multiple, uses_dense_mask
from ..data.layouts import build_batch, check_layout, group_pairs, unit_lengths
from ..data.pairs import IGNORE_INDEX, TokenizedPair
from ..loss import ops
from ..loss.validation import resolve_backend

# Rows of the softcapped head's logit tile (that head is not linear, so it materialises [chunk, V]).
SOFTCAP_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class OutputHead:
    """What maps a last hidden state h to logits: softcap(scale * (h @ weight.T + bias)).

    softcap(x) = cap * tanh(x / cap) when `softcap` is set (Gemma 2/3), the identity otherwise.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None


def output_head(model) -> OutputHead:
    """The output head of a transformers causal LM: its lm_head plus the known logit transforms.

    Handled: an lm_head bias (Phi, ...), `final_logit_softcapping` (Gemma 2/3), `logit_scale` (Cohere) and
    `logits_scaling` (Granite). A model that changes its logits in another way after the lm_head is
    scored wrongly: check such a model once with `pair_logps(..., reference=True)`.
    """
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"model.get_output_embeddings() must be a linear layer with a [V, H] weight, got {head!r}")
    bias = getattr(head, "bias", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", "") or ""
    scale = 1.0
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        scale = float(config.logit_scale)
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(weight=weight, bias=bias, scale=scale, softcap=None if softcap is None else float(softcap))


def head_token_logps(hidden: Tensor, head: OutputHead, labels: Tensor, *, backend: str = "auto") -> Tensor:
    """[N, H] hidden, [N] labels -> [N] float32 log-probs of the labels under `head` (0 where ignored)."""
    chosen_backend = resolve_backend(backend, hidden.device)
    hidden = hidden.to(head.weight.dtype)  # e.g. bf16 backbone output under autocast, float32 head
    if head.softcap is None:
        weight, bias = head.weight, head.bias
        if head.scale != 1.0:
            # A scaled head is a linear head with a scaled weight: the fused path stays exact.
            weight = weight * head.scale
            bias = None if bias is None else bias * head.scale
        return ops.linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX,
                                      backend=chosen_backend)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], SOFTCAP_CHUNK_TOKENS):
        e = min(s + SOFTCAP_CHUNK_TOKENS, hidden.shape[0])
        logits = hidden[s:e] @ head.weight.T
        if head.bias is not None:
            logits = logits + head.bias
        logits = logits.float() * head.scale
        logits = head.softcap * torch.tanh(logits / head.softcap)
        out[s:e] = ops.token_logps(logits, labels[s:e], ignore_index=IGNORE_INDEX, backend=chosen_backend)
    return out


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def model_base(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if is_peft_model(model) else model


def backbone_of(model):
    """The module that maps input ids to last hidden states (`model.get_decoder()` and its usual fallbacks)."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    for name in ("model", "transformer", "base_model"):
        module = getattr(model, name, None)
        if module is not None and module is not model:
            return module
    raise TypeError(f"cannot find the backbone of {type(model).__name__}: expected get_decoder(), .model or "
                    ".transformer returning last hidden states")


def check_sequence_lengths(pairs: Sequence[TokenizedPair], model, max_length: int) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limits = [("max_length", max_length)]
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:
        limits.append(("the model's max_position_embeddings", max_positions))
    window = getattr(config, "sliding_window", None)
    if window and any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["sliding"])):
        # Our mask replaces the model's, window included: exact only while no sequence outgrows the window.
        limits.append(("the model's sliding_window (layouts do not apply it)", window))
    for i, p in enumerate(pairs):
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
        for what, limit in limits:
            if longest > limit:
                raise ValueError(f"pairs[{i}] (dataset row {p.index}) has a sequence of {longest} tokens "
                                 f"(prompt + completion), more than {what}={limit}; truncate it when tokenizing "
                                 "(max_length, --max-length on the command line)")


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    # Padding is never attended to nor scored: any valid embedding row will do.
    return 0


def _as_tokenized(pairs: Sequence[TokenizedPair | Mapping[str, Any]], tokenizer,
                  max_length: int) -> list[TokenizedPair]:
    """TokenizedPair rows as they are; raw {"prompt", "chosen", "rejected"} rows through `tokenize_pair`."""
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            if tokenizer is None:
                raise ValueError(f"pairs[{i}] is a raw row: pass the tokenizer to tokenize it, or TokenizedPair rows")
            from ..data.tokenization import tokenize_row

            outcome = tokenize_row(tokenizer, p, max_length=max_length, index=i)
            if outcome.pair is None:
                # Dropping it would shift every later result: scoring needs each row.
                raise ValueError(f"pairs[{i}] cannot be scored: {outcome.drop_reason} (max_length={max_length})")
            p = outcome.pair
        if not isinstance(p, TokenizedPair):
            raise TypeError(f"pairs[{i}] must be a TokenizedPair or a raw preference row (a mapping), "
                            f"got {type(p).__name__}")
        out.append(p)
    return out


def _naive_pair_logps(model, pairs: Sequence[TokenizedPair], device) -> tuple[Tensor, Tensor]:
    """One unpadded forward per sequence, full logits, float64 log-softmax: the oracle the fast path must match."""
    out = torch.zeros(2, len(pairs), dtype=torch.float64)
    for i, p in enumerate(pairs):
        for j, completion in enumerate((p.chosen_ids, p.rejected_ids)):
            ids = torch.tensor([list(p.prompt_ids) + list(completion)], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(p.prompt_ids) - 1:-1].double()
            target = torch.tensor(completion, device=device)
            out[j, i] = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).sum().cpu()
    return out[0].float(), out[1].float()


@torch.no_grad()
def pair_logps(model, tokenizer, pairs: Sequence[TokenizedPair | Mapping[str, Any]], *, layout: str = "prefix_shared",
               max_length: int = 1024, max_tokens_per_batch: int | None = None, reference: bool = False,
               backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Summed log-probs of each pair's chosen and rejected completion given its prompt.

    Args:
        model: a transformers causal LM (`AutoModelForCausalLM`); attn_implementation "eager", "sdpa",
            "flex_attention" or "flash_attention_*" (not with "prefix_shared"), see
            `dpo_fast.data.attention.attention_kwargs`; on CUDA the packed layouts run FlexAttention when the
            model supports it (`preferred_attention`, restored after). Scored as is: call `model.eval()`
            to drop dropout.
        tokenizer: tokenizes raw rows, and gives the pad (else EOS) id; None pads with 0.
        pairs: TokenizedPair rows, or raw {"prompt", "chosen", "rejected"} rows tokenized here with
            `dpo_fast.data.tokenization.tokenize_pair(tokenizer, row, max_length=max_length)` (its truncation rules);
            a row it drops raises.
        layout: "prefix_shared" (prompt computed once per pair), "packed" or "padded".
        max_length: the longest prompt + completion: raw rows are truncated to it, a longer TokenizedPair raises.
        max_tokens_per_batch: token budget of one forward (padding included for "padded");
            default 8 * max_length, or the largest pair if that is more.
        reference: True scores through the plain path instead (one unpadded forward per sequence, full
            logits, float64): slow, for checking a model whose head `output_head` does not know.
        backend: token log-prob backend, "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    Returns:
        (chosen_logps, rejected_logps): float32 [len(pairs)] on the CPU, in input order.
    """
    check_layout(layout)
    pairs = _as_tokenized(pairs, tokenizer, max_length)
    if not pairs:
        return torch.zeros(0), torch.zeros(0)
    check_sequence_lengths(pairs, model, max_length)
    if reference:
        return _naive_pair_logps(model, pairs, next(model.parameters()).device)
    chosen = torch.zeros(len(pairs), dtype=torch.float32)
    rejected = torch.zeros(len(pairs), dtype=torch.float32)
    for scored in scored_batches(model, tokenizer, pairs, layout=layout, max_length=max_length,
                                 max_tokens_per_batch=max_tokens_per_batch, backend=backend):
        b = len(scored.members)
        sums = torch.zeros(2 * b, dtype=torch.float32, device=scored.token_logps.device)
        sums = sums.index_add_(0, scored.segment_ids, scored.token_logps).cpu()
        index = torch.tensor(scored.members)
        chosen[index], rejected[index] = sums[:b], sums[b:]
    return chosen, rejected


@dataclass(frozen=True)
class ScoredBatch:
    """The scored tokens of one batch: pair i of `members` owns segments i (chosen) and B + i (rejected)."""

    members: list[int]  # indexes into the pairs given to `scored_batches`
    segment_ids: Tensor  # [scored tokens] segment of each token, in row order
    token_logps: Tensor  # [scored tokens] float32 log-prob of each token


def scored_batches(model, tokenizer, pairs: Sequence[TokenizedPair], *, layout: str, max_length: int,
                   max_tokens_per_batch: int | None, backend: str):
    """Yields a `ScoredBatch` per batch: pairs grouped under a token budget, laid out, run through the
    backbone with the layout's attention (`dpo_fast.data.attention.model_inputs`; FlexAttention for the packed
    layouts on CUDA when the model supports it, `preferred_attention`), and scored at labelled positions
    only by the fused head."""
    device = next(model.parameters()).device
    head = output_head(model)
    backbone = backbone_of(model)
    pad_id = pad_token_id(tokenizer)
    if max_tokens_per_batch is None:
        largest = max(unit_lengths(pairs, layout)) * (2 if layout != "prefix_shared" else 1)
        max_tokens_per_batch = max(8 * max_length, largest)
    with attention_for(model, layout, device):
        impl = attention_implementation(model)
        for members in group_pairs(pairs, layout, max_tokens_per_batch=max_tokens_per_batch):
            batch_pairs = [pairs[i] for i in members]
            # A dense mask costs R * L^2: rows as long as the batch's longest unit, so shorter pairs share
            # rows and no row pays for more attention than the longest sequence needs anyway (rows of
            # max_length cost 1.6 s on 20 tiny pairs on the CPU, against milliseconds). FlexAttention skips
            # masked blocks and flash runs varlen: one row, no padding beyond FlexAttention's tile.
            row_tokens = max(unit_lengths(batch_pairs, layout)) if uses_dense_mask(impl) else None
            batch = build_batch(batch_pairs, layout, pad_id=pad_id, max_tokens_per_row=row_tokens,
                                pad_to_multiple_of=row_multiple(impl))
            hidden = backbone(**model_inputs(model, batch, device), use_cache=False)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            segments = batch.segment_ids.reshape(-1).to(device)
            scored = segments >= 0
            labels = batch.labels.reshape(-1).to(device)[scored]
            tok = head_token_logps(hidden.reshape(-1, hidden.shape[-1])[scored], head, labels, backend=backend)
            yield ScoredBatch(list(members), segments[scored], tok)
