"""The two-pass Triton schedule (`dpo_fast.loss.ops.triton_linear`) against the float64 reference.

Every case draws hidden, weight and bias in the dtype under test and gives the reference
(`dpo_fast.loss.oracle.token_logps` on full float64 logits) those exact values upcast to float64.

Tolerances (`_bounds`) follow what the schedule does, element by element:
  - The logits are a cuBLAS/torch product in the input dtype, so each carries one rounding: at most
    `eps` of the largest |logit| of its row (delta). A log-prob then moves by at most 2 delta (the target
    and the log-sum-exp), and each softmax entry p by at most 2 delta p.
  - D = g (onehot - softmax) is written in the input dtype: `eps` of |g (onehot - p)| more, plus for fp16
    a subnormal ulp of the chunk's scale (2^-24 times a power of two below 2 max|g|).
  - dh = D W and dweight = D^T h sum those errors weighted by |W| and |h|; each output is rounded once
    (`out_eps`), and a bf16 dweight once more per token chunk (it is summed in bf16 chunk by chunk).
  - dbias sums D's errors over tokens.
eps is the dtype's rounding with a factor 2 of margin (2^-8 bf16, 2^-10 fp16), 16 float32 ulps for
float32 and float64 (whose logits-in kernel computes in float32).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede any import of dpo_fast.kernels: triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpo_fast  # noqa: E402
from dpo_fast.loss import oracle  # noqa: E402
from dpo_fast.loss.formulas import LOSS_TYPES  # noqa: E402
from dpo_fast.loss.ops import schedule, triton_linear, triton_one_pass  # noqa: E402
from tests.helpers import assert_within  # noqa: E402
from tests.test_one_pass import _allclose, _check_against_reference, _to_packed  # noqa: E402
from tests.test_one_pass import _case as _one_pass_case  # noqa: E402

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps

# eps: rounding of a logit and of D in the input dtype; out_eps: rounding of an output in that dtype;
# sub: absolute rounding of a D entry below fp16's smallest normal, relative to the chunk's scale.
TOL = {
    torch.float64: dict(eps=16 * EPS32, out_eps=16 * EPS32, sub=0.0),
    torch.float32: dict(eps=16 * EPS32, out_eps=16 * EPS32, sub=0.0),
    torch.bfloat16: dict(eps=2.0**-8, out_eps=2.0**-8, sub=0.0),
    torch.float16: dict(eps=2.0**-10, out_eps=2.0**-10, sub=2.0**-24),
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


def _budget_tokens(tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """A logits budget holding `tokens` rows of the vocabulary in `dtype`."""
    return tokens * vocab * dtype.itemsize


def _bounds(dtype, logits, labels, grad, h64, w64, chunks):
    """Elementwise error bounds of (logps, dhidden, dweight, dbias); see the module docstring."""
    tol = TOL[dtype]
    scored = labels != IGNORE
    gs = torch.where(scored, grad.double(), 0.0)
    probs = torch.softmax(logits, dim=-1)
    onehot = torch.zeros_like(probs)
    onehot[scored, labels[scored]] = 1.0
    coef = (onehot - probs).abs() * gs.abs()[:, None]
    delta = tol["eps"] * logits.abs().amax(dim=1, keepdim=True)
    sub = tol["sub"] * 2 * gs.abs().max()
    d_err = 2 * delta * probs * gs.abs()[:, None] + tol["eps"] * coef + sub
    logps = torch.where(scored, 2 * delta[:, 0], 0.0) + 1e-5 * (1 + logits.abs().amax(dim=1))
    dw_chunk = chunks * tol["out_eps"] if dtype == torch.bfloat16 else 0.0
    return logps, d_err @ w64, d_err.T @ h64 + dw_chunk * (coef.T @ h64), d_err.sum(0)


def _check(hidden, weight, bias, labels, grad, dtype, *, chunks=1):
    """Forward and every gradient of the op against the float64 reference; returns the leaves."""
    hidden, weight, bias, labels, grad = (_to(t, device=DEVICE) for t in (hidden, weight, bias, labels, grad))
    params = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + (() if bias is None else (bias,))]
    out = triton_linear.linear_token_logps(params[0], params[1], labels, bias=params[2] if bias is not None else None,
                                           ignore_index=IGNORE)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    out.backward(grad)

    ref = [t.detach().cpu().double().requires_grad_(True) for t in params]
    logits = ref[0] @ ref[1].T + (ref[2] if bias is not None else 0)
    labels, grad = labels.cpu(), grad.cpu()
    expected = oracle.token_logps(logits, labels, ignore_index=IGNORE)
    expected.backward(grad.double())
    assert bool((out[labels.to(out.device) == IGNORE] == 0).all()), "ignored tokens must give exactly 0"

    with torch.no_grad():
        b_logps, b_dh, b_dw, b_db = _bounds(dtype, logits, labels, grad, ref[0].abs(), ref[1].abs(), chunks)
    out_eps = TOL[dtype]["out_eps"]
    assert_within("logps", out.cpu(), expected.detach(), b_logps)
    for name, p, r, bound in (("dhidden", params[0], ref[0], b_dh), ("dweight", params[1], ref[1], b_dw)):
        assert p.grad.dtype == p.dtype
        assert_within(name, p.grad.cpu(), r.grad, bound + out_eps * r.grad.abs() + TOL[dtype]["sub"])
    if bias is not None:
        assert params[2].grad.dtype == params[2].dtype
        assert_within("dbias", params[2].grad.cpu(), ref[2].grad,
                      b_db + out_eps * ref[2].grad.abs() + TOL[dtype]["sub"])
    return params


DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (N, H, V, bias, chunk tokens or None for the default budget): several chunks with a ragged last one,
# one token, no bias, a vocabulary that is not a power of two.
CASES = [
    (47, 40, 1000, True, 20),
    (1, 16, 123, True, None),
    (47, 16, 123, False, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,v,bias,chunk", CASES)
def test_forward_and_grads(monkeypatch, n, h, v, bias, chunk, dtype):
    if chunk is not None:
        monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", _budget_tokens(chunk, v, dtype))
    tensors = _inputs(n, h, v, dtype, bias=bias, seed=n + h + v, ignore_rows=range(16, min(n, 32)))
    _check(*tensors, dtype, chunks=1 if chunk is None else -(-n // chunk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_ragged_vocab(dtype):
    # 32003 = 3 full 8192-wide bf16 tiles (7 of 4096 in float32) and a ragged one.
    _check(*_inputs(3, 16, 32003, dtype, seed=3), dtype)


def test_float16_dweight_in_vocab_groups(monkeypatch):
    # A float16 dweight is summed in float32 one 32-row vocabulary group at a time: 4 groups, the last ragged
    # (123 = 3 * 32 + 27), token chunks inside each; the onehot and the bias use group-local ids, labels of
    # other groups match no column, and dhidden sums the groups' products.
    monkeypatch.setattr(triton_linear, "WEIGHT_GROUP_BYTES", 4 * 16 * 32)
    assert triton_linear.weight_group_rows(123, 16, triton_linear.WEIGHT_GROUP_BYTES) == 32
    monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", _budget_tokens(9, 123, torch.float16))
    tensors = _inputs(40, 16, 123, torch.float16, bias=True, seed=17, ignore_rows=range(3, 9))
    _check(*tensors, torch.float16)


def test_float16_small_upstream_gradient():
    """g ~ 1e-4 (a loss averaged over a large batch): g * softmax is below fp16's smallest normal, so D is
    formed as g / 2^k (|D| <= 1) and the products are scaled back in float32."""
    hidden, weight, bias, labels, grad = _inputs(30, 16, 200, torch.float16, seed=19)
    _check(hidden, weight, bias, labels, grad * 1e-4, torch.float16)


def test_every_token_ignored_gives_zeros_and_zero_grads():
    hidden, weight, bias, labels, grad = _inputs(20, 16, 77, torch.float32, seed=5)
    labels[:] = IGNORE
    params = _check(hidden, weight, bias, labels, grad, torch.float32)
    for p in params:
        assert bool((p.grad == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow (inf - inf) under the interpreter
def test_overflowing_ignored_rows_do_not_poison_the_gradients():
    """Padding rows may hold anything finite: logits that overflow to inf there must not leak NaN."""
    hidden, weight, bias, labels, grad = _inputs(20, 16, 77, torch.float32, seed=4)
    labels[3] = IGNORE
    hidden[3] = 1e38  # its float32 logits overflow to +-inf, its log-sum-exp to inf or NaN
    params = _check(hidden, weight, bias, labels, grad, torch.float32)
    assert bool((params[0].grad[3] == 0).all())


def test_ignore_index_that_is_a_vocab_id():
    # ignore_index = 0 (a pad id): tokens labelled 0 are not scored even though 0 is a real column.
    hidden, weight, bias, labels, grad = _inputs(9, 16, 50, torch.float32, seed=6)
    labels[labels == IGNORE] = 0
    out = triton_linear.linear_token_logps(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE),
                                           bias=bias.to(DEVICE), ignore_index=0)
    logits = hidden.double() @ weight.double().T + bias.double()
    expected = oracle.token_logps(logits, labels, ignore_index=0)
    assert_within("logps", out.cpu(), expected, 1e-5 * expected.abs() + 1e-5)


def test_float64_inputs_keep_their_dtype():
    hidden, weight, bias, labels, grad = _inputs(7, 16, 40, torch.float64, seed=7)
    params = _check(hidden, weight, bias, labels, grad, torch.float64)
    assert all(p.grad.dtype == torch.float64 for p in params)


def test_bias_in_another_dtype():
    # A float32 bias on a bf16 head: it joins the product in bf16 (as the lm_head's addmm would), and its
    # gradient comes back in float32.
    hidden, weight, bias, labels, grad = _inputs(21, 16, 90, torch.bfloat16, seed=20)
    _check(hidden, weight, bias.float(), labels, grad, torch.bfloat16)


def test_strided_hidden_and_partial_requires_grad():
    """A column slice of a wider tensor (row stride > H), and gradients only where asked for."""
    hidden, weight, bias, labels, grad = _inputs(19, 24, 90, torch.float32, seed=8)
    wide = torch.randn(19, 40)
    wide[:, 5:29] = hidden
    h = wide.to(DEVICE)[:, 5:29].detach().requires_grad_(True)
    w = weight.to(DEVICE)
    b = bias.to(DEVICE).clone().requires_grad_(True)
    out = triton_linear.linear_token_logps(h, w, labels.to(DEVICE), bias=b)
    out.backward(grad.to(DEVICE))
    ref = [t.double().requires_grad_(True) for t in (hidden, bias)]
    expected = oracle.token_logps(ref[0] @ weight.double().T + ref[1], labels, ignore_index=IGNORE)
    expected.backward(grad.double())
    assert_within("logps", out.cpu(), expected.detach(), 1e-5 * expected.detach().abs() + 1e-5)
    scale_h, scale_b = ref[0].grad.abs().max(), ref[1].grad.abs().max()
    assert_within("dhidden", h.grad.cpu(), ref[0].grad, 1e-5 * scale_h + 1e-5 * ref[0].grad.abs())
    assert_within("dbias", b.grad.cpu(), ref[1].grad, 1e-5 * scale_b + 1e-5 * ref[1].grad.abs())
    assert w.grad is None


def test_no_grad_runs_the_forward_only(monkeypatch):
    """The reference model's pass: log-probs equal to the differentiable call's, no graph, and the backward
    op never runs."""
    hidden, weight, bias, labels, _ = (_to(t, device=DEVICE) for t in _inputs(15, 16, 60, torch.float32, seed=21))
    monkeypatch.setattr(triton_linear, "_bwd_op", None)  # any call would fail
    with torch.no_grad():
        out = triton_linear.linear_token_logps(hidden.requires_grad_(), weight, labels, bias=bias)
    assert out.grad_fn is None and not out.requires_grad
    expected = oracle.token_logps(hidden.double() @ weight.double().T + bias.double(), labels,
                                     ignore_index=IGNORE)
    assert_within("logps", out, expected, 1e-5 * expected.abs() + 1e-5)


def test_out_of_range_label_gives_nan():
    hidden, weight, bias, labels, _ = _inputs(5, 16, 30, torch.float32, seed=9)
    labels[2] = 30
    out = triton_linear.linear_token_logps(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE),
                                           bias=bias.to(DEVICE))
    assert bool(torch.isnan(out[2])) and bool(torch.isfinite(out[[0, 1, 3, 4]]).all())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda h, w, b, lab: (h, w.half(), lab, {}), TypeError, "weight is torch.float16 but hidden is torch.float32"),
        (lambda h, w, b, lab: (h, w[:, :8], lab, {}), ValueError, r"weight must have shape \[V, 16\]"),
        (lambda h, w, b, lab: (h, w, lab[:3], {}), ValueError, r"labels must have shape \[5\]"),
        (lambda h, w, b, lab: (h, w, lab.float(), {}), TypeError, "labels must hold integer token ids"),
        (lambda h, w, b, lab: (h, w, lab, {"bias": b[:4]}), ValueError, r"bias must have shape \[30\]"),
        (lambda h, w, b, lab: (h[0], w, lab, {}), ValueError, r"hidden must have shape \[N, H\]"),
    ],
)
def test_bad_input(make, exc, match):
    hidden, weight, bias, labels, _ = _inputs(5, 16, 30, torch.float32, seed=11)
    h, w, lab, kw = make(hidden, weight, bias, labels)
    with pytest.raises(exc, match=match):
        triton_linear.linear_token_logps(h, w, lab, **kw)


def test_torch_compile_traces_without_graph_break(monkeypatch):
    monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", _budget_tokens(8, 70, torch.float32))  # 3 chunks
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


_COMPILED_MODE_TRACE = r"""
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from dpo_fast.loss.ops import schedule, triton_linear
assert triton_linear._COMPILED, "kernels were interpreted"
schedule.LOGITS_BUDGET_BYTES = 8 * 300 * 2  # 8-token chunks: the loop and the concatenation are traced

def step(h, w, b, y, g):
    leaves = [t.detach().requires_grad_() for t in (h, w, b)]
    out = triton_linear.linear_token_logps(*leaves[:2], y, bias=leaves[2])
    return (out, *torch.autograd.grad(out, leaves, g))

for dtype in (torch.bfloat16, torch.float16):
    args = (torch.randn(21, 32, dtype=dtype), torch.randn(300, 32, dtype=dtype), torch.randn(300, dtype=dtype),
            torch.randint(0, 300, (21,)), torch.randn(21))
    gm = make_fx(step, tracing_mode="fake")(*args)
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "dpo_fast.linear_token_logps_fwd.default" in ops and "dpo_fast.linear_token_logps_bwd.default" in ops, ops
    out, dh, dw, db = (n.meta["val"] for n in gm.graph.find_nodes(op="output")[0].args[0])
    assert out.dtype == torch.float32 and (dh.dtype, dw.dtype, db.dtype) == (dtype,) * 3, (out, dh, dw, db)
    # Inside the ops: the functionalized decomposition Inductor sees (products, kernels whose in-place output
    # aliases an input) must trace with fake tensors too.
    inner = make_fx(torch.func.functionalize(triton_linear._backward_impl), tracing_mode="fake")(
        args[4], args[0], args[1], args[2], args[3], torch.randn(21), -100, True, True, True,
        schedule.LOGITS_BUDGET_BYTES, 2 * 4 * 32 * 100)
    kernels = [n for n in inner.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert kernels, [str(n.target) for n in inner.graph.nodes]
print("traced")
"""


def test_compiled_mode_op_traces_with_fake_tensors():
    """On CUDA the op is a triton_op, which torch.compile traces into (products, kernel launches, the chunk
    loop): traced here with fake tensors in a child process without the interpreter, so no GPU is needed."""
    import subprocess
    import sys

    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILED_MODE_TRACE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- linear_dpo_loss, two-pass schedule


def _public(leaves, labels, ref_c, ref_r, kwargs, segment_ids=None, **extra):
    return dpo_fast.linear_dpo_loss(leaves[0], leaves[1], labels, ref_c, ref_r, bias=leaves[2],
                                    segment_ids=segment_ids, backend="triton", **kwargs, **extra)


def _no_one_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the one-pass schedule ran where the two-pass one was due")
    monkeypatch.setattr(triton_one_pass, "linear_dpo_loss_pair_chunks", refuse)


def _pairs_case(seed, loss_type, dtype, *, packed, **shape):
    """tests/test_one_pass.py's case (padded, or packed with gaps in a shuffled order), on DEVICE:
    (hidden, weight, bias, labels, segment_ids, ref_c, ref_r, kwargs)."""
    hidden, weight, bias, labels, ref_c, ref_r, kwargs = _one_pass_case(seed, loss_type, dtype, **shape)
    segment_ids = None
    if packed:
        hidden, labels, segment_ids = _to_packed(hidden, labels, seed=seed + 1)
    tensors = (_to(t, device=DEVICE) for t in (hidden, weight, bias, labels, segment_ids, ref_c, ref_r))
    return (*tensors, kwargs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_with_pairs_split_across_the_budget(monkeypatch, loss_type):
    """Every loss type through `linear_dpo_loss(backend="triton")` with a logits budget of 7 tokens: no pair
    fits, so the two-pass schedule runs (for aot/aot_unpaired it is the schedule whatever the budget), and
    its token chunks cut through pairs. Padded with a fully masked rejected response where the loss allows
    one, or packed (alternately); forward and every gradient against the float64 reference."""
    _no_one_pass(monkeypatch)
    packed = bool(LOSS_TYPES.index(loss_type) % 2)
    hidden, weight, bias, labels, segment_ids, ref_c, ref_r, kwargs = _pairs_case(40, loss_type, torch.float32,
                                                                                  packed=packed)
    monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", _budget_tokens(7, weight.shape[0], torch.float32))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _public(leaves, labels, ref_c, ref_r, kwargs, segment_ids)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, torch.float32,
                             segment_ids=segment_ids, one_pass=False)


@pytest.mark.parametrize("dtype,packed", [(torch.float16, False), (torch.float16, True), (torch.bfloat16, False)])
def test_half_precision_through_the_public_api(monkeypatch, dtype, packed):
    """float16 always takes the two-pass schedule; bf16 does when a pair exceeds the budget (here 9 tokens)."""
    _no_one_pass(monkeypatch)
    hidden, weight, bias, labels, segment_ids, ref_c, ref_r, kwargs = _pairs_case(42, "sigmoid", dtype, packed=packed,
                                                                                  b=2, t=23)
    if dtype == torch.bfloat16:
        monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", _budget_tokens(9, weight.shape[0], dtype))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _public(leaves, labels, ref_c, ref_r, kwargs, segment_ids)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_c, ref_r, kwargs, dtype,
                             segment_ids=segment_ids, one_pass=False)


def test_reference_log_probs_from_ref_hidden_run_forward_only(monkeypatch):
    """ref_hidden: the reference model's log-probs come from the two-pass forward under no_grad, whose
    backward op never runs (the policy's loss here goes through the one-pass schedule)."""
    hidden, weight, bias, labels, _, _, _, kwargs = _pairs_case(44, "sigmoid", torch.float32, packed=False)
    noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(45)).to(DEVICE)
    ref_hidden = hidden + 0.1 * noise
    monkeypatch.setattr(triton_linear, "_bwd_op", None)  # any call would fail
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _public(leaves, labels, None, None, kwargs, ref_hidden=ref_hidden)
    with torch.no_grad():
        # The reference head has no bias unless ref_bias is passed.
        ref_out = oracle.linear_dpo_loss(ref_hidden.double(), weight.double(), labels, **kwargs)
    # The reference log-probs the call derived from ref_hidden, read back from the rewards.
    beta = kwargs["beta"]
    _allclose("ref_chosen_logps", out.chosen_logps - out.chosen_rewards / beta, ref_out.chosen_logps, torch.float32)
    _allclose("ref_rejected_logps", out.rejected_logps - out.rejected_rewards / beta, ref_out.rejected_logps,
              torch.float32)
    _check_against_reference(out, leaves, (hidden, weight, bias, labels), ref_out.chosen_logps,
                             ref_out.rejected_logps, kwargs, torch.float32)


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
def test_gpu_llama3_shape_bf16():
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
    out = triton_linear.linear_token_logps(h_, w_, labels)
    out.backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # The bf16 gradients and one logits chunk (<= LOGITS_BUDGET_BYTES) are the only big allocations:
    # [N, V] logits (1 GB in bf16) never appear; 128 MiB of slack for the [N] vectors and the D W product.
    assert peak <= (n * h + v * h) * 2 + schedule.LOGITS_BUDGET_BYTES + 128 * 2**20, f"peak {peak / 2**30:.2f} GiB"

    # bf16 logits (as the model's lm_head computes them): log-probs within a few bf16 ulps of the logits.
    assert_within("logps", out.double(), exp_logps.double(), 2**-6 * exp_logps.double().abs() + 0.05)
    for name, got, exp in (("dhidden", h_.grad, exp_dh), ("dweight", w_.grad, exp_dw)):
        e = exp.double()
        assert_within(name, got, e, 2**-6 * e.abs().max() + 2**-8 * e.abs())


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
