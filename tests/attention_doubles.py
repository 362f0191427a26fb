"""Stand-ins that let the CPU test-suite run the GPU attention paths with the same maths.

- `eager_flex_attention(monkeypatch)`: transformers compiles FlexAttention on first use (inductor, which on
  the CPU means a C++ build per shape); the tests run torch's FlexAttention uncompiled instead. torch
  refuses its backward on the CPU up front, though the eager autograd of the higher-order op runs there
  (the math path); the refusal is lifted for the tests, whose float64 oracles check the gradients.
- `register_varlen_sdpa()`: an attention implementation whose name contains "flash", so that dpo_fast
  feeds it varlen boundaries (`cu_seq_lens_q`, no mask) exactly as it feeds flash-attention, and which
  computes block-diagonal causal sdpa from them.
"""

from __future__ import annotations

import torch

VARLEN_SDPA = "flash_varlen_sdpa"


def eager_flex_attention(monkeypatch) -> None:
    import torch.nn.attention.flex_attention as torch_flex
    import transformers.integrations.flex_attention as hf_flex

    def uncompiled(query, key, value, training=False, **kwargs):
        return torch_flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)


def register_varlen_sdpa(calls: list | None = None) -> str:
    """Registers `VARLEN_SDPA` with transformers' AttentionInterface; each call appends its token count to `calls`."""
    from transformers import AttentionInterface

    def varlen_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert attention_mask is None, "the varlen path passes boundaries, not a mask"
        cu = kwargs["cu_seq_lens_q"]
        rows, heads, length, dim = query.shape
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device),
                                      (cu[1:] - cu[:-1]).long()).view(rows, 1, length)
        cols = torch.arange(length, device=cu.device)
        allowed = (seq.unsqueeze(-1) == seq.unsqueeze(-2)) & (cols.view(-1, 1) >= cols.view(1, -1))
        if calls is not None:
            calls.append(int(cu[-1]))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
    return VARLEN_SDPA


def use_varlen_sdpa(model) -> None:
    """Switches a Llama-like model to `VARLEN_SDPA` (transformers' setter refuses flash names it cannot load)."""
    model.config._attn_implementation = VARLEN_SDPA
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = VARLEN_SDPA
