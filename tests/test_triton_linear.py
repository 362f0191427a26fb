"""Triton fused-linear token log-probs (`dpo_fast.ops.triton_linear`) against the float64 reference.

Every case draws hidden, weight and bias in the dtype under test and gives the reference
(`dpo_fast.reference.token_logps` on full float64 logits) those exact values upcast to float64, so the
comparison measures the kernels' arithmetic only.

Tolerances (TOL) follow what the kernels do:
  - The logits are float32 accumulations of exact products whatever the input dtype, so the forward
    (float32 out) gets a float32 tolerance for every dtype.
  - The gradients multiply `coef = onehot - softmax` (|coef| <= 1, per-token factor g applied in
    float32) by weight or hidden in a tensor-core dot, so coef is rounded to the input dtype first:
    each term errs by at most `dot_eps` of its magnitude (half an ulp, taken as a full ulp for margin),
    plus, for fp16, a subnormal ulp. The bound is elementwise: dot_eps * (|g coef| @ |weight|) for
    dhidden, the same with hidden for dweight, so cancelling sums get the absolute slack they need
    and nothing more. Then the result is rounded to the output dtype: `out_eps` of |result|.
  - dbias sums float32 terms (no dot): float32 tolerance plus the output rounding.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede any import of dpo_fast.kernels: triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpo_fast  # noqa: E402
from dpo_fast import reference  # noqa: E402
from dpo_fast.ops import triton_linear  # noqa: E402
from dpo_fast.ops.triton_linear import LinearBlocks  # noqa: E402
from tests.helpers import assert_within  # noqa: E402

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps

# dot_eps: relative rounding of a dot operand (coef) in the input dtype; out_eps: rounding of an output
# in the input dtype; sub: absolute rounding of a coef below the dtype's smallest normal (fp16 only).
# float32 dots and outputs: a few ulps of float32 for the accumulation over H or V (<= 32k terms).
TOL = {
    torch.float32: dict(logps_rtol=1e-5, logps_atol=1e-5, dot_eps=16 * EPS32, out_eps=16 * EPS32, sub=0.0),
    torch.bfloat16: dict(logps_rtol=1e-5, logps_atol=1e-5, dot_eps=2.0**-8, out_eps=2.0**-8, sub=0.0),
    torch.float16: dict(logps_rtol=1e-5, logps_atol=1e-5, dot_eps=2.0**-11, out_eps=2.0**-10, sub=2.0**-24),
}


def _inputs(n, h, v, dtype, *, bias=True, seed=0, ignore_rows=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    # Logits of a few units, like a trained head: softmax neither uniform nor one-hot.
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = IGNORE
    labels[list(ignore_rows)] = IGNORE
    grad = torch.randn(n, generator=g)
    return hidden, weight, b, labels, grad


def _to(t, **kw):
    return None if t is None else t.to(**kw)


def _check(hidden, weight, bias, labels, grad, dtype, **op_kwargs):
    """Forward and every gradient of the Triton op against the float64 reference."""
    hidden, weight, bias, labels, grad = (_to(t, device=DEVICE) for t in (hidden, weight, bias, labels, grad))
    params = [t.detach().requires_grad_(True) for t in (hidden, weight) + (() if bias is None else (bias,))]
    out = triton_linear.linear_token_logps(params[0], params[1], labels, bias=params[2] if bias is not None else None,
                                           ignore_index=IGNORE, **op_kwargs)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    out.backward(grad)

    ref = [t.detach().double().requires_grad_(True) for t in params]
    logits = ref[0] @ ref[1].T + (ref[2] if bias is not None else 0)
    expected = reference.token_logps(logits, labels, ignore_index=IGNORE)
    expected.backward(grad.double())

    tol = TOL[dtype]
    assert_within("logps", out, expected.detach(), tol["logps_rtol"] * expected.detach().abs() + tol["logps_atol"])
    assert bool((out[labels == IGNORE] == 0).all()), "ignored tokens must give exactly 0"

    # |g * coef| per token and vocab entry, from the float64 softmax: the size of each gradient term.
    with torch.no_grad():
        scored = (labels != IGNORE).double()
        probs = torch.softmax(logits, dim=-1)
        onehot = torch.zeros_like(probs)
        onehot[scored.bool(), labels[scored.bool()]] = 1.0
        gcoef = ((onehot - probs) * (grad.double() * scored)[:, None]).abs()
        gscale = (grad.double() * scored).abs()
        h64, w64 = ref[0].detach().abs(), ref[1].detach().abs()
        # A dot operand below fp16's smallest normal rounds to a multiple of 2^-24 times its scale,
        # whatever its own size. The scale: g itself (tiles, dhidden), the tile's largest |g| (tiles,
        # dweight), or a power of two below twice the chunk's largest |g| (chunked, every product).
        chunked = (op_kwargs.get("schedule") or triton_linear.DEFAULT_SCHEDULE) == "chunked"
        chunk_scale = 2 * gscale.max()
        dh_sub = tol["sub"] * (chunk_scale if chunked else gscale[:, None]) * w64.sum(0)
        dw_sub = tol["sub"] * (chunk_scale if chunked else gscale.max()) * h64.sum(0)
    # The chunked schedule rounds g * coef to the input dtype once for both products and the bias sum,
    # and (bf16) each chunk's dweight product once more before adding it in float32.
    dw_roundings = 2 if chunked and dtype == torch.bfloat16 else 1
    for name, p, r, terms, sub in (("dhidden", params[0], ref[0], gcoef @ w64, dh_sub),
                                   ("dweight", params[1], ref[1], dw_roundings * (gcoef.T @ h64), dw_sub)):
        assert p.grad.dtype == p.dtype
        # The output's own rounding: out_eps relative, or a subnormal ulp for tiny fp16 results.
        tol_out = tol["out_eps"] * r.grad.abs() + tol["sub"]
        assert_within(name, p.grad, r.grad, tol["dot_eps"] * terms + sub + tol_out)
    if bias is not None:
        # Tiles sum float32 terms; chunked sums the rounded [chunk, V] buffer (scaled as above).
        db_eps = tol["dot_eps"] if chunked else 16 * EPS32
        db_sub = tol["sub"] * chunk_scale * len(labels) if chunked else 0.0
        db_tol = db_eps * gcoef.sum(0) + db_sub + tol["out_eps"] * ref[2].grad.abs() + tol["sub"]
        assert_within("dbias", params[2].grad, ref[2].grad, db_tol)
    return params


DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (N, H, V, bias, blocks, v_splits, schedule, chunk_tokens): small tiles so that small shapes still run
# several token tiles (one of them all ignored), several vocab tiles with a ragged last one, ragged H
# steps, several vocab splits, several chunks with a ragged last one; None = the device's defaults.
CASES = [
    (47, 40, 1000, True, LinearBlocks(16, 64, 16), 3, "tiles", None),
    (47, 40, 1000, False, LinearBlocks(16, 128, 32), 1, "chunked", 20),
    (1, 16, 123, True, None, None, "tiles", None),
    (47, 16, 123, False, None, None, "tiles", None),
    (47, 16, 123, True, None, None, "chunked", 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,v,bias,blocks,v_splits,schedule,chunk_tokens", CASES)
def test_forward_and_grads(n, h, v, bias, blocks, v_splits, schedule, chunk_tokens, dtype):
    tensors = _inputs(n, h, v, dtype, bias=bias, seed=n + h + v, ignore_rows=range(16, min(n, 32)))
    _check(*tensors, dtype, blocks=blocks, v_splits=v_splits, schedule=schedule, chunk_tokens=chunk_tokens)


def test_large_ragged_vocab():
    # 32003 = 7 full 4096-wide tiles and a 3331-wide ragged one.
    _check(*_inputs(3, 16, 32003, torch.float32, seed=3), torch.float32, blocks=LinearBlocks(16, 4096, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_schedule_in_vocab_pieces(monkeypatch, dtype):
    # dweight's cuBLAS products in 16-row pieces of the vocabulary: 8 pieces, the last one ragged.
    monkeypatch.setattr(triton_linear, "PRODUCT_PIECE_ELEMENTS", 16 * 16)
    tensors = _inputs(40, 16, 123, dtype, seed=16)
    _check(*tensors, dtype, schedule="chunked", chunk_tokens=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", ["tiles", "chunked"])
def test_vocab_groups(monkeypatch, schedule, dtype):
    # A 16-bit dweight summed in float32 one 32-row vocab group at a time: 4 groups of 2 vocab tiles,
    # the last one ragged (123 = 3 * 32 + 27); the bias gradient and the onehot must use group-local
    # ids, and (chunked) dhidden sums the groups' products. float32 weights take the ungrouped path.
    monkeypatch.setattr(triton_linear, "WEIGHT_GROUP_BYTES", 4 * 16 * 32)
    monkeypatch.setattr(triton_linear, "_num_sms", lambda index: 1)  # on CUDA, the per-SM floor: one tile
    assert triton_linear.weight_group_rows(123, 16, 16, torch.device(DEVICE)) == 32
    tensors = _inputs(40, 16, 123, dtype, bias=True, seed=17, ignore_rows=range(3, 9))
    _check(*tensors, dtype, blocks=LinearBlocks(16, 16, 16), schedule=schedule, chunk_tokens=16)


def test_default_schedule_is_read_at_each_call(monkeypatch):
    # The benchmark times both backwards through the public API by setting DEFAULT_SCHEDULE.
    tensors = _inputs(20, 16, 77, torch.bfloat16, seed=18)
    monkeypatch.setattr(triton_linear, "DEFAULT_SCHEDULE", "chunked")
    _check(*tensors, torch.bfloat16, blocks=LinearBlocks(16, 32, 16), chunk_tokens=8)
    monkeypatch.setattr(triton_linear, "DEFAULT_SCHEDULE", "diagonal")
    with pytest.raises(ValueError, match="schedule='diagonal' is not known"):
        triton_linear.linear_token_logps(*tensors[:2], tensors[3])


@pytest.mark.parametrize("schedule", ["tiles", "chunked"])
def test_every_token_ignored_gives_zeros_and_zero_grads(schedule):
    hidden, weight, bias, labels, grad = _inputs(20, 16, 77, torch.float32, seed=5)
    labels[:] = IGNORE
    params = _check(hidden, weight, bias, labels, grad, torch.float32, blocks=LinearBlocks(16, 32, 16),
                    schedule=schedule)
    for p in params:
        assert bool((p.grad == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow (inf - inf) under the interpreter
def test_overflowing_ignored_rows_do_not_poison_the_gradients():
    """Padding rows may hold anything finite: logits that overflow to inf there must not leak NaN."""
    hidden, weight, bias, labels, grad = _inputs(20, 16, 77, torch.float32, seed=4)
    labels[3] = IGNORE
    huge = hidden.clone()
    huge[3] = 1e38  # its logits overflow to +-inf, its log-sum-exp to inf or NaN
    params = [t.to(DEVICE).requires_grad_(True) for t in (huge, weight, bias)]
    out = triton_linear.linear_token_logps(params[0], params[1], labels.to(DEVICE), bias=params[2],
                                           blocks=LinearBlocks(16, 32, 16))
    out.backward(grad.to(DEVICE))
    # Row 3 is not scored, so it must not matter: the same as with an ordinary row there.
    clean = [t.to(DEVICE).requires_grad_(True) for t in (hidden, weight, bias)]
    expected = triton_linear.linear_token_logps(clean[0], clean[1], labels.to(DEVICE), bias=clean[2],
                                                blocks=LinearBlocks(16, 32, 16))
    expected.backward(grad.to(DEVICE))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, exp in zip(params, clean):
        torch.testing.assert_close(got.grad, exp.grad, rtol=0, atol=0)


def test_ignore_index_that_is_a_vocab_id():
    # ignore_index = 0 (a pad id): tokens labelled 0 are not scored even though 0 is a real column.
    hidden, weight, bias, labels, grad = _inputs(9, 16, 50, torch.float32, seed=6)
    labels[labels == IGNORE] = 0
    out = triton_linear.linear_token_logps(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE),
                                           bias=bias.to(DEVICE), ignore_index=0)
    logits = hidden.double() @ weight.double().T + bias.double()
    expected = reference.token_logps(logits, labels, ignore_index=0)
    assert_within("logps", out.cpu(), expected, 1e-5 * expected.abs() + 1e-5)


def test_float64_inputs_run_in_float32():
    hidden, weight, bias, labels, grad = _inputs(7, 16, 40, torch.float64, seed=7)
    params = _check(hidden, weight, bias, labels, grad, torch.float32)
    assert all(p.grad.dtype == torch.float64 for p in params)


def test_strided_hidden_and_partial_requires_grad():
    """A column slice of a wider tensor (row stride > H), and gradients only where asked for."""
    hidden, weight, bias, labels, grad = _inputs(19, 24, 90, torch.float32, seed=8)
    wide = torch.randn(19, 40)
    wide[:, 5:29] = hidden
    h = wide.to(DEVICE)[:, 5:29].detach().requires_grad_(True)
    w = weight.to(DEVICE)
    b = bias.to(DEVICE).clone().requires_grad_(True)
    lab = labels.to(DEVICE)
    out = triton_linear.linear_token_logps(h, w, lab, bias=b, blocks=LinearBlocks(16, 32, 16))
    out.backward(grad.to(DEVICE))
    ref = [t.double().requires_grad_(True) for t in (hidden, bias)]
    expected = reference.token_logps(ref[0] @ weight.double().T + ref[1], labels, ignore_index=IGNORE)
    expected.backward(grad.double())
    assert_within("logps", out.cpu(), expected.detach(), 1e-5 * expected.detach().abs() + 1e-5)
    scale_h, scale_b = ref[0].grad.abs().max(), ref[1].grad.abs().max()
    assert_within("dhidden", h.grad.cpu(), ref[0].grad, 1e-5 * scale_h + 1e-5 * ref[0].grad.abs())
    assert_within("dbias", b.grad.cpu(), ref[1].grad, 1e-5 * scale_b + 1e-5 * ref[1].grad.abs())
    assert w.grad is None


def test_out_of_range_label_gives_nan():
    hidden, weight, bias, labels, _ = _inputs(5, 16, 30, torch.float32, seed=9)
    labels[2] = 30
    out = triton_linear.linear_token_logps(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE),
                                           bias=bias.to(DEVICE))
    assert bool(torch.isnan(out[2])) and bool(torch.isfinite(out[[0, 1, 3, 4]]).all())


def test_deterministic_mode_uses_one_vocab_split():
    """Vocab splits add into dhidden in any order; torch's deterministic mode must turn them off."""
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert triton_linear.dhidden_splits(5) == 5
        torch.use_deterministic_algorithms(True)
        assert triton_linear.dhidden_splits(5) == 1
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda h, w, b, lab: (h, w.half(), lab, {}), TypeError, "weight is torch.float16 but hidden is torch.float32"),
        (lambda h, w, b, lab: (h, w[:, :8], lab, {}), ValueError, r"weight must have shape \[V, 16\]"),
        (lambda h, w, b, lab: (h, w, lab[:3], {}), ValueError, r"labels must have shape \[5\]"),
        (lambda h, w, b, lab: (h, w, lab.float(), {}), TypeError, "labels must hold integer token ids"),
        (lambda h, w, b, lab: (h, w, lab, {"bias": b[:4]}), ValueError, r"bias must have shape \[30\]"),
        (lambda h, w, b, lab: (h[0], w, lab, {}), ValueError, r"hidden must have shape \[N, H\]"),
        (lambda h, w, b, lab: (h, w, lab, {"blocks": LinearBlocks(16, 24, 16)}), ValueError,
         "blocks.block_v must be a power of two >= 16"),
        (lambda h, w, b, lab: (h, w, lab, {"blocks": LinearBlocks(8, 32, 16)}), ValueError,
         "blocks.block_n must be a power of two >= 16"),
        (lambda h, w, b, lab: (h, w, lab, {"v_splits": 0}), ValueError, "v_splits must be >= 1"),
        (lambda h, w, b, lab: (h, w, lab, {"schedule": "fused"}), ValueError, "schedule='fused' is not known"),
        (lambda h, w, b, lab: (h, w, lab, {"schedule": "chunked", "chunk_tokens": 0}), ValueError,
         "chunk_tokens must be >= 1"),
    ],
)
def test_bad_input(make, exc, match):
    hidden, weight, bias, labels, _ = _inputs(5, 16, 30, torch.float32, seed=11)
    h, w, lab, kw = make(hidden, weight, bias, labels)
    with pytest.raises(exc, match=match):
        triton_linear.linear_token_logps(h, w, lab, **kw)


def test_torch_compile_traces_without_graph_break():
    hidden, weight, bias, labels, grad = (_to(t, device=DEVICE) for t in _inputs(21, 16, 70, torch.float32, seed=12))

    def loss(h, w, b):
        return (triton_linear.linear_token_logps(h, w, labels, bias=b) * grad).sum()

    eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss(*eager).backward()
    compiled = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # no C++ toolchain needed on the CPU
    torch.compile(loss, backend=backend, fullgraph=True)(*compiled).backward()
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the public API, backend="triton"


def _pairs(b, t, v, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    prompt = torch.randint(0, t // 2, (2 * b,), generator=g)
    labels[torch.arange(t) < prompt[:, None]] = IGNORE
    labels[:, -2:] = IGNORE  # right padding
    hidden = torch.randn(2 * b, t, h, generator=g).to(dtype)
    ref_hidden = torch.randn(2 * b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype)
    return labels, hidden, ref_hidden, weight, bias


def _pack(labels, values):
    """Padded [2B, T, H] -> packed [N, H]: scored tokens plus one unscored one per row, shuffled."""
    rows, t = labels.shape
    keep = labels != IGNORE
    keep[:, 0] = True
    seg = torch.where(labels != IGNORE, torch.arange(rows)[:, None].expand(rows, t), -1)
    order = torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(0))
    return values[keep][order], labels[keep][order], seg[keep][order]


@pytest.mark.parametrize(
    "dtype,loss_type,packed,with_ref_hidden",
    [
        (torch.float32, "sigmoid", False, False),
        (torch.float32, "ipo", True, False),
        (torch.float32, "sigmoid", False, True),
        (torch.bfloat16, "sigmoid", True, True),
        (torch.float16, "ipo", False, False),
    ],
)
def test_linear_dpo_loss_triton_backend(dtype, loss_type, packed, with_ref_hidden):
    b, t, v, h = 2, 11, 157, 24
    labels, hidden, ref_hidden, weight, bias = _pairs(b, t, v, h, dtype, seed=13)
    kw = dict(beta=0.3, loss_type=loss_type)
    segment_ids = None
    if packed:
        (hidden, _, _), (ref_hidden, labels, segment_ids) = _pack(labels, hidden), _pack(labels, ref_hidden)
        segment_ids = segment_ids.to(DEVICE)
    if with_ref_hidden:
        kw["ref_hidden"] = ref_hidden.to(DEVICE)
    else:
        kw["ref_chosen_logps"] = (-torch.rand(b) * 20).to(DEVICE)
        kw["ref_rejected_logps"] = (-torch.rand(b) * 20).to(DEVICE)

    params = [x.to(DEVICE).requires_grad_(True) for x in (hidden, weight, bias)]
    out = dpo_fast.linear_dpo_loss(params[0], params[1], labels.to(DEVICE), bias=params[2],
                                   segment_ids=segment_ids, backend="triton", **kw)
    out.loss.backward()
    ref = [x.detach().cpu().double().requires_grad_(True) for x in params]
    ref_kw = {k: (x.cpu() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    exp = reference.linear_dpo_loss(ref[0], ref[1], labels, bias=ref[2], segment_ids=_to(segment_ids, device="cpu"),
                                    **ref_kw)
    exp.loss.backward()

    # The loss is a smooth function of the log-probs, whose float32 tolerance is 1e-5 (see TOL).
    for name in ("losses", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        e = getattr(exp, name).detach()
        assert_within(name, getattr(out, name).cpu(), e, 1e-5 * e.abs() + 1e-5)
    # Gradients: the loss scales the token coefficients, so the kernels' bound (TOL) applies relative to
    # the largest gradient entry of the tensor (dot terms are at most that size times the row's |coef| sum
    # of 2), plus the rounding of each output.
    tol = TOL[dtype]
    for name, p, r in zip(("dhidden", "dweight", "dbias"), params, ref):
        scale = r.grad.abs().max()
        eps = 16 * EPS32 if name == "dbias" else tol["dot_eps"]
        assert_within(name, p.grad.cpu(), r.grad, 2 * eps * scale + tol["out_eps"] * r.grad.abs())


# ---------------------------------------------------------------- GPU code generation, without a GPU

_COMPILE_FOR_SM90 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dpo_fast.kernels import linear_logps
from dpo_fast.ops import triton_linear

assert isinstance(linear_logps._linear_logps_fwd, triton.runtime.jit.JITFunction), "still interpreted"
dtype = sys.argv[1]
blocks = triton_linear.CUDA_BLOCKS if dtype != "fp32" else triton_linear.CUDA_BLOCKS_FP32
constexprs = dict(HAS_BIAS=True, COMPUTE_WEIGHT=True, COMPUTE_BIAS=True, UPCAST_DOT=False,
                  INPUT_PRECISION="ieee" if dtype == "fp32" else None, BLOCK_N=blocks.block_n,
                  BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h)
for name in ("_linear_logps_fwd", "_linear_logps_bwd_hidden", "_linear_logps_bwd_weight",
             "_linear_logps_bwd_dlogits"):
    fn = getattr(linear_logps, name)
    # The naming convention gives the types: Capitalised = pointer, ALL_CAPS = constexpr, else int.
    sig, consts = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg.isupper():
            sig[arg] = "constexpr"
            consts[(i,)] = constexprs[arg]
        elif arg[0].isupper():
            sig[arg] = {"Labels": "*i64", "Hidden": "*" + dtype, "Weight": "*" + dtype, "Bias": "*" + dtype,
                        "DLogits": "*" + dtype}.get(arg, "*fp32")
        else:
            sig[arg] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=triton_linear.CUDA_NUM_WARPS, num_stages=triton_linear.CUDA_NUM_STAGES))
    print(name, "ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
@pytest.mark.parametrize("dtype", ["bf16"])
def test_kernels_compile_for_h100(dtype):
    """Code generation for sm_90 (H100) at the CUDA tile sizes, offline: catches what the interpreter
    cannot (tl.dot shapes and dtypes, layouts, constexpr branches), without running anything."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, dtype], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 4, done.stdout


# ---------------------------------------------------------------- real shapes, CUDA only


def _chunked_fp32(hidden, weight, labels, grad, chunk=512):
    """Token log-probs and gradients from float32 logits, chunk by chunk (full TF32 off)."""
    w32 = weight.float()
    logps = torch.zeros(hidden.shape[0], device=hidden.device)
    dhidden = torch.zeros(hidden.shape, device=hidden.device)
    dweight = torch.zeros(w32.shape, device=hidden.device)
    valid = labels != IGNORE
    g = torch.where(valid, grad, 0.0)
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk].float()
        logits = h @ w32.T
        lse = torch.logsumexp(logits, dim=-1)
        safe = torch.where(valid[s:s + chunk], labels[s:s + chunk], 0)
        target = logits.gather(1, safe[:, None]).squeeze(1)
        logps[s:s + chunk] = torch.where(valid[s:s + chunk], target - lse, 0.0)
        coef = -torch.softmax(logits, dim=-1)
        coef.scatter_add_(1, safe[:, None], valid[s:s + chunk, None].float())
        coef *= g[s:s + chunk, None]
        dhidden[s:s + chunk] = coef @ w32
        dweight += coef.T @ h
    return logps, dhidden, dweight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schedule", ["tiles", "chunked"])
def test_gpu_llama3_shape_bf16(schedule):
    n, h, v = 4096, 4096, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * (2.0 / h**0.5)).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    labels[: n // 4] = IGNORE  # a prompt's worth of unscored tokens
    grad = torch.randn(n, device="cuda", generator=gen) * 1e-3
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exp_logps, exp_dh, exp_dw = _chunked_fp32(hidden, weight, labels, grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

    h_ = hidden.clone().requires_grad_(True)
    w_ = weight.clone().requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = triton_linear.linear_token_logps(h_, w_, labels, schedule=schedule)
    out.backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # Gradients (bf16) and their float32 accumulators are the only big allocations: [N, V] logits
    # (1 GB in bf16, 2 GB in float32) must never appear. The chunked schedule adds its [chunk, V]
    # buffer (<= 256 MiB) and product pieces (<= 64 MiB of float32 plus their bf16 source); 64 MiB of
    # slack for the [N] vectors.
    grads_and_accumulators = (n * h + v * h) * (2 + 4)
    chunked_extra = (256 + 96) * 2**20 if schedule == "chunked" else 0
    assert peak <= grads_and_accumulators + chunked_extra + 64 * 2**20, f"peak {peak / 2**30:.2f} GiB"

    tol = TOL[torch.bfloat16]
    assert_within("logps", out.double(), exp_logps.double(), 1e-4 * exp_logps.double().abs() + 1e-4)
    for name, got, exp in (("dhidden", h_.grad, exp_dh), ("dweight", w_.grad, exp_dw)):
        e = exp.double()
        assert_within(name, got, e, 2 * tol["dot_eps"] * e.abs().max() + tol["out_eps"] * e.abs())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inductor_compiles_triton_op():
    hidden, weight, bias, labels, grad = (t.cuda() for t in _inputs(300, 64, 5000, torch.bfloat16, seed=14))
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]

    def loss(h, w, b):
        return (triton_linear.linear_token_logps(h, w, labels, bias=b) * grad).sum()

    torch.compile(loss, fullgraph=True)(*params).backward()
    eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss(*eager).backward()
    for e, c in zip(eager, params):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_deterministic_mode_is_bitwise_reproducible():
    hidden, weight, bias, labels, grad = (t.cuda() for t in _inputs(512, 256, 4000, torch.bfloat16, seed=15))

    def dhidden():
        h = hidden.clone().requires_grad_(True)
        triton_linear.linear_token_logps(h, weight, labels, bias=bias, v_splits=8).backward(grad)
        return h.grad

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = dhidden(), dhidden()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)
