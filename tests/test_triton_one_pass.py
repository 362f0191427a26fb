"""The pair-chunk one-pass schedule of `linear_dpo_loss` on the triton backend (`ops.triton_one_pass`), the
CUDA default for pair-separable losses, against the float64 reference: forward and the gradients of hidden,
weight and bias, every pair-separable loss, float32 and bf16, padded and packed (tokens in a random
order), fully masked responses, pairs grouped under a small logits budget. Under TRITON_INTERPRET=1 on the
CPU (set by conftest). Which schedule runs when is tests/test_schedule.py's."""

from __future__ import annotations

import pytest
import torch

from dpo_fast.loss import ops
from dpo_fast.loss.formulas import PAIR_SEPARABLE, LossConfig
from dpo_fast.loss.functional import _FlatHidden, linear_dpo_loss
from dpo_fast.loss.ops import schedule, triton_one_pass
from tests.test_one_pass import IGNORE, _check_against_reference, _to_packed
from tests.test_one_pass import _case as _cpu_case

# Compiled kernels need CUDA tensors; on the CPU (TRITON_INTERPRET=1, set by conftest) they stay there.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(*args, **kwargs):
    *tensors, config_kwargs = _cpu_case(*args, **kwargs)
    return (*(None if t is None else t.to(DEVICE) for t in tensors), config_kwargs)


def _run(hidden, weight, bias, labels, ref_c, ref_r, *, segment_ids=None, **kwargs):
    config = LossConfig(**kwargs)
    flat = _FlatHidden(hidden, labels, segment_ids, IGNORE, weight.shape[0])
    assert ops.linear_loss_schedule_for(config, flat, weight, bias, backend="triton") == schedule.TRITON_ONE_PASS
    lengths = flat.lengths() if config.needs_lengths else None
    return triton_one_pass.linear_dpo_loss_pair_chunks(
        config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences, IGNORE, ref_c, ref_r,
        lengths,
    )


def _budget_for(pairs_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    return pairs_tokens * vocab * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type,nll_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("nca_pair", 0.4),
                                                  ("simpo", 0.0), ("apo_zero", 0.0)])
def test_padded_against_reference(monkeypatch, loss_type, nll_weight, dtype):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(21, loss_type, dtype)
    kwargs["nll_weight"] = nll_weight
    # Room for about one and a half pairs: groups of one pair, and of two where two short ones fit.
    monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", _budget_for(50, weight.shape[0], dtype))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _run(*leaves, labels, ref_c, ref_r, **kwargs)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_tokens_in_random_order(dtype):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(22, "sigmoid", dtype, b=2, t=23)
    packed_h, packed_l, seg = _to_packed(hidden.cpu(), labels.cpu(), seed=4)
    perm = torch.randperm(packed_h.shape[0], generator=torch.Generator().manual_seed(5))
    packed_h, packed_l, seg = (t[perm].to(DEVICE) for t in (packed_h, packed_l, seg))
    leaves = [t.clone().requires_grad_() for t in (packed_h, weight, bias)]
    out = _run(*leaves, packed_l, ref_c, ref_r, segment_ids=seg, **kwargs)
    _check_against_reference(out, leaves, (packed_h, weight, bias, packed_l), ref_c, ref_r, kwargs, dtype,
                             segment_ids=seg)


def test_grad_output_scales_every_gradient():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(23, "hinge", torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _run(*leaves, labels, ref_c, ref_r, **kwargs)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, torch.float32,
                             grad_scale=-2.5)


def test_no_grad_gives_the_log_probs():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(24, "sigmoid", torch.float32)
    with torch.no_grad():
        out = _run(hidden, weight, bias, labels, ref_c, ref_r, **kwargs)
    expected = linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, backend="torch", **kwargs)
    torch.testing.assert_close(out.chosen_logps, expected.chosen_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert not out.loss.requires_grad


def _spy(monkeypatch) -> list:
    calls = []
    original = triton_one_pass.linear_dpo_loss_pair_chunks
    monkeypatch.setattr(triton_one_pass, "linear_dpo_loss_pair_chunks",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("loss_type", sorted(PAIR_SEPARABLE))
def test_every_pair_separable_loss_through_the_public_api(monkeypatch, loss_type):
    """The default: `linear_dpo_loss(backend="triton")` runs this schedule for every pair-separable loss,
    padded (with a fully masked rejected response where the loss allows one) or packed (alternately)."""
    calls = _spy(monkeypatch)
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(30, loss_type, torch.float32)
    segment_ids = None
    if sorted(PAIR_SEPARABLE).index(loss_type) % 2:
        hidden, labels, segment_ids = (t.to(DEVICE) for t in _to_packed(hidden.cpu(), labels.cpu(), seed=31))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_dpo_loss(leaves[0], leaves[1], labels, ref_c, ref_r, bias=leaves[2], segment_ids=segment_ids,
                          backend="triton", **kwargs)
    assert calls == [1]
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, torch.float32,
                             segment_ids=segment_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pair_whose_tokens_are_consecutive(dtype):
    # One pair, padded: its chosen and rejected scored tokens are adjacent rows, so the group is a view
    # of the hidden states and its dh rows are written in place (the other tests gather and scatter).
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(27, "ipo", dtype, b=1, t=29)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _run(*leaves, labels, ref_c, ref_r, **kwargs)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, dtype)
