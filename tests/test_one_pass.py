"""The one-pass torch schedule of `linear_dpo_loss` against the float64 reference (full logits).

Every pair-separable loss, forward and the gradients of hidden, weight and bias, on odd shapes, in
the padded and the packed forms, with masked tokens and a fully masked sequence.
"""

from __future__ import annotations

import pytest
import torch

from dpo_fast.loss import ops, oracle
from dpo_fast.loss.formulas import LENGTH_NORMALISED, LOSS_TYPES, PAIR_SEPARABLE, REFERENCE_FREE, LossConfig
from dpo_fast.loss.functional import _FlatHidden, linear_dpo_loss
from dpo_fast.loss.ops import schedule, torch_one_pass

IGNORE = -100

# (rtol, atol) against the float64 reference run on the same (rounded) inputs; atol is scaled by the
# largest magnitude of the expected tensor (as in tests/helpers.py: a gradient entry is a sum of terms
# as large as the largest entries). float64: round-off only. float32: here |logp| ~ 150, and the error
# of the float32 per-sequence sums reaches the gradients through the loss's curvature (the recompute
# schedule shares it: measured 2.4e-5 x max for its gradients on the sppo_hard case below, 1.4e-5 for
# this schedule), so atol is 5e-5 rather than the shared table's 1e-6 set on shorter sequences.
# bfloat16: the logit matmul runs in bfloat16 like the model's lm_head (as in the recompute schedule and
# the naive path), so every logit carries up to 2^-9 relative rounding before the float32 softmax;
# the log-probs of 37-token sequences move by ~0.1 and the gradients with them (over 12 seeds of the
# bf16 case below: max error median 1.2%, worst 4.1% of the largest entry; the recompute schedule 2.2%
# and 4.9%). So the gradients are compared with the plain float64 reference at 3e-2, and the forward
# values with the float64 reference on the rounded logits (ROUNDED_LOGITS_FORWARD).
# float16 (the triton two-pass schedule): the same model with 3 more mantissa bits, so bf16's tolerances / 8.
TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-5, 5e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (3e-2 / 8, 3e-2 / 8),
    "bf16 logits": (1e-3, 1e-4),
    "fp16 logits": (1e-3 / 8, 1e-4 / 8),
}
# Low-precision dtypes whose forward values (log-probs, losses, rewards) are compared with the float64
# reference on the lm_head's rounded logits, under the named tolerance: the gradients still are compared
# with the plain float64 reference.
ROUNDED_LOGITS_FORWARD = {torch.bfloat16: "bf16 logits", torch.float16: "fp16 logits"}

LOSS_KWARGS = {
    "exo_pair": dict(label_smoothing=1e-3),
    "robust": dict(label_smoothing=0.1),
    "sigmoid": dict(label_smoothing=0.05),
    "simpo": dict(simpo_gamma=0.3),
    "discopop": dict(discopop_tau=0.5),
}


def _allclose(name: str, got: torch.Tensor, want: torch.Tensor, dtype, scale: float = 0.0) -> None:
    """`scale`: the magnitude the error is relative to when larger than `want`'s own (see the rewards)."""
    rtol, atol = TOLERANCES[dtype]
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel():
        atol = atol * max(1.0, float(want.abs().max()), scale)
    err = (got - want).abs()
    bad = (err > atol + rtol * want.abs()) | ~torch.isfinite(got)
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())} of {got.numel()} elements off, max err "
                             f"{float(err.max()):.3g} (rtol={rtol}, atol={atol:.3g}); first at {idx}: "
                             f"got {got[bad][:5].tolist()} want {want[bad][:5].tolist()}")


def _case(seed: int, loss_type: str, dtype: torch.dtype, *, b=3, t=19, h=13, v=41, fully_masked_row=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    # Prompt-like prefixes of different lengths, some padding at the end.
    for r in range(2 * b):
        labels[r, : 1 + (r * 3) % 5] = IGNORE
        labels[r, t - (r % 3):] = IGNORE
    if fully_masked_row and loss_type not in LENGTH_NORMALISED:
        labels[b + 1] = IGNORE  # a rejected response with no scored token
    if loss_type in REFERENCE_FREE:
        ref_c = ref_r = None
    else:
        # A reference close to the policy, as at the start of training, keeps every loss in its sensitive
        # region (hinge inside its margin, sppo_hard near its targets): no gradient is trivially zero.
        with torch.no_grad():
            start = oracle.linear_dpo_loss(hidden, weight, labels, bias=bias)
        ref_c = start.chosen_logps + torch.randn(b, generator=g, dtype=torch.float64)
        ref_r = start.rejected_logps + torch.randn(b, generator=g, dtype=torch.float64)
    kwargs = dict(beta=0.3, loss_type=loss_type, **LOSS_KWARGS.get(loss_type, {}))
    return hidden, weight, bias, labels, ref_c, ref_r, kwargs


def _to_packed(hidden, labels, seed: int):
    """Padded [2B, T, H] -> packed [N, H] with sequences shuffled in token order and -1 gaps."""
    rows, t, h = hidden.shape
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=g).tolist()
    hs, ls, ss = [], [], []
    for r in order:
        hs.append(hidden[r])
        ls.append(labels[r])
        ss.append(torch.full((t,), r))
        # An unscored gap token between sequences whose label is a real id: segment -1 must win.
        hs.append(torch.randn(1, h, generator=g, dtype=torch.float64).to(hidden.dtype))
        ls.append(torch.zeros(1, dtype=torch.long))
        ss.append(torch.full((1,), -1))
    return torch.cat(hs), torch.cat(ls), torch.cat(ss)


def _one_pass(hidden, weight, bias, labels, ref_c, ref_r, *, segment_ids=None, chunk=7, single_buffer=None,
              **kwargs):
    """Calls the one-pass schedule directly (the public function may pick the recompute one)."""
    config = LossConfig(**kwargs)
    flat = _FlatHidden(hidden, labels, segment_ids, IGNORE, weight.shape[0])
    lengths = flat.lengths() if config.needs_lengths else None
    return torch_one_pass.linear_dpo_loss_one_pass(
        config, flat.values, weight, bias, flat.labels, flat.segment_ids, flat.num_sequences, IGNORE,
        ref_c, ref_r, lengths, chunk=chunk, single_buffer=single_buffer,
    )


def _check_against_reference(out, inputs, reference_inputs, ref_c, ref_r, kwargs, dtype, segment_ids=None,
                             grad_scale=1.0, one_pass=True):
    """`one_pass`: the output comes from a one-pass schedule, whose per-pair fields are detached (the
    token-level schedules leave `losses` and the log-probs in the graph, as autograd made them)."""
    hidden, weight, bias = inputs
    (out.loss * grad_scale).backward()
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in reference_inputs[:3])
    labels = reference_inputs[3]
    want = oracle.linear_dpo_loss(h64, w64, labels, ref_c, ref_r, bias=b64, segment_ids=segment_ids, **kwargs)
    (want.loss * grad_scale).backward()
    forward_dtype = dtype
    if dtype in ROUNDED_LOGITS_FORWARD:
        # The forward values are compared with the reference on logits rounded as the lm_head rounds them.
        with torch.no_grad():
            logits = (h64 @ w64.T + b64).to(dtype).double()
        want = oracle.fused_dpo_loss(logits, labels, ref_c, ref_r, segment_ids=segment_ids, **kwargs)
        forward_dtype = ROUNDED_LOGITS_FORWARD[dtype]
    for name in ("loss", "losses", "chosen_logps", "rejected_logps"):
        _allclose(name, getattr(out, name), getattr(want, name), forward_dtype)
    # A reward is beta * (logp - ref_logp): the log-probs' rounding error survives the cancellation.
    logp_scale = kwargs["beta"] * float(torch.cat([want.chosen_logps, want.rejected_logps]).detach().abs().max())
    for name in ("chosen_rewards", "rejected_rewards"):
        _allclose(name, getattr(out, name), getattr(want, name), forward_dtype, scale=logp_scale)
    for name, g in (("dhidden", h64.grad), ("dweight", w64.grad), ("dbias", b64.grad)):
        assert float(g.abs().max()) > 1e-3, f"{name} is ~0: the test would not see a wrong gradient"
    _allclose("dhidden", hidden.grad, h64.grad, dtype)
    _allclose("dweight", weight.grad, w64.grad, dtype)
    _allclose("dbias", bias.grad, b64.grad, dtype)
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype and bias.grad.dtype == bias.dtype
    for name in ("losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert not (one_pass and getattr(out, name).requires_grad), name


@pytest.mark.parametrize("nll_weight", [0.0, 0.4])
@pytest.mark.parametrize("loss_type", sorted(PAIR_SEPARABLE))
def test_padded_float64_every_loss(loss_type, nll_weight):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(1, loss_type, torch.float64)
    kwargs["nll_weight"] = nll_weight
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _one_pass(*leaves, labels, ref_c, ref_r, **kwargs)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs,
                             torch.float64)


@pytest.mark.parametrize("loss_type", sorted(PAIR_SEPARABLE))
def test_packed_float64_every_loss(loss_type):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(2, loss_type, torch.float64, b=2, t=23)
    packed_h, packed_l, seg = _to_packed(hidden, labels, seed=3)
    leaves = [t.clone().requires_grad_() for t in (packed_h, weight, bias)]
    # chunk=5 makes tiles straddle the chosen/rejected boundary of a pair.
    out = _one_pass(*leaves, packed_l, ref_c, ref_r, segment_ids=seg, chunk=5, **kwargs)
    _check_against_reference(out, leaves, (packed_h, weight, bias, packed_l), ref_c, ref_r, kwargs,
                             torch.float64, segment_ids=seg)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair"])
def test_interleaved_tokens(loss_type, dtype):
    """Token rows in a random order: no run of a sequence's tokens is consecutive, so every tile and every
    dh row goes through the gather/scatter path instead of the view path that consecutive rows take."""
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(7, loss_type, dtype, b=2, t=23)
    packed_h, packed_l, seg = _to_packed(hidden, labels, seed=8)
    perm = torch.randperm(packed_h.shape[0], generator=torch.Generator().manual_seed(9))
    packed_h, packed_l, seg = packed_h[perm], packed_l[perm], seg[perm]
    leaves = [t.clone().requires_grad_() for t in (packed_h, weight, bias)]
    out = _one_pass(*leaves, packed_l, ref_c, ref_r, segment_ids=seg, chunk=4, **kwargs)
    _check_against_reference(out, leaves, (packed_h, weight, bias, packed_l), ref_c, ref_r, kwargs, dtype,
                             segment_ids=seg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair", "simpo"])
def test_low_precision_tolerance(loss_type, dtype):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(4, loss_type, dtype, b=2, t=37, h=24, v=97)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _one_pass(*leaves, labels, ref_c, ref_r, chunk=16, **kwargs)
    assert out.chosen_logps.dtype == torch.float32
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, dtype)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_single_and_two_buffers_agree(loss_type):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(5, loss_type, torch.float64)
    grads = []
    for single in (True, False):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        _one_pass(*leaves, labels, ref_c, ref_r, single_buffer=single, **kwargs).loss.backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        _allclose("grad", a, b, torch.float64)


def test_single_buffer_refused_where_it_does_not_apply():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(6, "nca_pair", torch.float64)
    with pytest.raises(ValueError, match="single_buffer=True"):
        _one_pass(hidden, weight, bias, labels, ref_c, ref_r, single_buffer=True, **kwargs)


def test_grad_output_scales_every_gradient():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(7, "apo_zero", torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _one_pass(*leaves, labels, ref_c, ref_r, **kwargs)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs,
                             torch.float64, grad_scale=-2.5)


def test_only_hidden_needs_grad():
    """A frozen lm_head (LoRA): no weight-gradient buffers, hidden's gradient still exact."""
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(8, "sppo_hard", torch.float64)
    h = hidden.clone().requires_grad_()
    out = _one_pass(h, weight, bias, labels, ref_c, ref_r, **kwargs)
    out.loss.backward()
    h64 = hidden.clone().requires_grad_()
    oracle.linear_dpo_loss(h64, weight, labels, ref_c, ref_r, bias=bias, **kwargs).loss.backward()
    _allclose("dhidden", h.grad, h64.grad, torch.float64)


def test_no_grad_gives_log_probs_only():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(9, "sigmoid", torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.no_grad():
        out = _one_pass(*leaves, labels, ref_c, ref_r, **kwargs)
    assert not out.loss.requires_grad
    want = oracle.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, **kwargs)
    tol = torch.float64
    _allclose("loss", out.loss, want.loss, tol)
    _allclose("chosen_logps", out.chosen_logps, want.chosen_logps, tol)
    _allclose("rejected_logps", out.rejected_logps, want.rejected_logps, tol)


def test_public_function_with_ref_hidden_matches_reference():
    """Through `linear_dpo_loss` (whichever schedule it picks), reference log-probs from ref_hidden."""
    hidden, weight, bias, labels, _, _, kwargs = _case(10, "robust", torch.float64)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_dpo_loss(leaves[0], leaves[1], labels, bias=leaves[2], ref_hidden=ref_hidden, backend="torch",
                          **kwargs)
    out.loss.backward()
    h64, w64, b64 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = oracle.linear_dpo_loss(h64, w64, labels, bias=b64, ref_hidden=ref_hidden, **kwargs)
    want.loss.backward()
    # The reference log-probs from ref_hidden come out of the recompute schedule in float32.
    tol = torch.float32
    _allclose("loss", out.loss, want.loss, tol)
    for name, a, b in zip(("dhidden", "dweight", "dbias"), (t.grad for t in leaves), (h64.grad, w64.grad, b64.grad)):
        _allclose(name, a, b, tol)


def test_length_normalised_empty_response_names_the_row():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(11, "ipo", torch.float64)
    labels[1] = IGNORE  # chosen response of pair 1 has no scored token
    with pytest.raises(ValueError, match=r"chosen_lengths\[1\]"):
        _one_pass(hidden, weight, bias, labels, ref_c, ref_r, **kwargs)


def _hook(loss_type: str, backend: str):
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(12, "sigmoid", torch.float64)
    config = LossConfig(beta=0.1, loss_type=loss_type)
    flat = _FlatHidden(hidden, labels, None, IGNORE, weight.shape[0])
    return ops.linear_dpo_loss_one_pass(config, flat, weight, bias, ref_c, ref_r, backend=backend)


@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - PAIR_SEPARABLE))
def test_hook_declines_batch_coupled_losses(loss_type):
    assert _hook(loss_type, "torch") is None


def _min_tokens(config: LossConfig) -> int:
    one = torch_one_pass.single_buffer_applies(config)
    return schedule.TORCH_MIN_TOKENS_PER_PAIR["one buffer" if one else "two buffers"]


def test_hook_picks_one_pass_for_long_pairs_and_matches_reference():
    config = LossConfig(beta=0.3, loss_type="nca_pair")
    per_seq = _min_tokens(config) // 2 + 9  # scored tokens per pair above the threshold
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(13, "nca_pair", torch.float64, b=2, t=per_seq + 5,
                                                               fully_masked_row=False)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    flat = _FlatHidden(leaves[0], labels, None, IGNORE, weight.shape[0])
    assert int((flat.labels != IGNORE).sum()) >= _min_tokens(config) * 2
    out = ops.linear_dpo_loss_one_pass(config, flat, leaves[1], leaves[2], ref_c, ref_r, backend="torch")
    assert out is not None
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, torch.float64)


def test_hook_leaves_short_pairs_to_the_recompute_schedule():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(14, "sigmoid", torch.float64, b=2, t=9)
    flat = _FlatHidden(hidden, labels, None, IGNORE, weight.shape[0])
    config = LossConfig(**kwargs)
    assert int((flat.labels != IGNORE).sum()) < _min_tokens(config) * 2
    assert ops.linear_dpo_loss_one_pass(config, flat, weight, bias, ref_c, ref_r, backend="torch") is None


def test_second_backward_is_a_clear_error():
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _case(15, "sigmoid", torch.float64)
    w = weight.clone().requires_grad_()
    out = _one_pass(hidden, w, bias, labels, ref_c, ref_r, **kwargs)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()
