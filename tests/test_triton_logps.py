"""Triton token log-probs (`dpo_fast.loss.ops.triton_logps`) against the float64 reference.

Every case builds logits in the dtype under test, upcasts those exact values to float64 for the
reference, and compares the forward and the gradient w.r.t. the logits.

Tolerances (see TOL): the kernels accumulate in float32 whatever the input dtype, so the forward
(always float32 out) gets a float32 tolerance for every dtype; the gradient is written in the logits'
dtype, so it gets the rounding of that dtype (about one ulp) on top of the float32 arithmetic.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede any import of dpo_fast.kernels: triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpo_fast  # noqa: E402
from dpo_fast.loss import oracle  # noqa: E402
from dpo_fast.loss.ops import triton_logps  # noqa: E402
from tests.helpers import assert_within  # noqa: E402

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS32 = torch.finfo(torch.float32).eps

# Per dtype: (logps rtol, atol) and dlogits rtol.
#  - logps: float32 accumulation of a log-sum-exp of logits of magnitude ~10 over <= 32k terms errs by
#    a few float32 ulps of |lse| (~1e-6): 1e-5 for every input dtype (the inputs are exact in float64).
#  - dlogits: softmax from a float32 lse whose error is a few 1e-7 relative, then rounded to the output
#    dtype (half an ulp, <= eps/2 relative): eps of the dtype (one to two ulps) for bf16/fp16, and a
#    float32 bound of 1e-5 for float32.
TOL = {
    torch.float32: dict(logps_rtol=1e-5, logps_atol=1e-5, grad_rtol=1e-5),
    torch.bfloat16: dict(logps_rtol=1e-5, logps_atol=1e-5, grad_rtol=torch.finfo(torch.bfloat16).eps),
    torch.float16: dict(logps_rtol=1e-5, logps_atol=1e-5, grad_rtol=torch.finfo(torch.float16).eps),
}


def _grad_tol(dtype: torch.dtype, expected: torch.Tensor, labels: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for dlogits = g * (onehot - p).

    rtol * |expected| everywhere; on the target column also a few float32 ulps of |g| (g - g*p cancels
    when p -> 1); and one subnormal ulp of the dtype (fp16 results below 6e-5 are subnormal).
    """
    tol = TOL[dtype]["grad_rtol"] * expected.abs()
    scored = labels != IGNORE
    rows = scored.nonzero().squeeze(-1)
    tol[rows, labels[rows]] += 16 * EPS32 * g.double()[rows].abs()
    finfo = torch.finfo(dtype)
    return tol + finfo.smallest_normal * finfo.eps


def _make(n: int, v: int, dtype: torch.dtype, seed: int, ignore_frac: float = 0.25):
    gen = torch.Generator().manual_seed(seed)
    # Scale 4: peaked softmaxes (p spans many decades), as in trained LMs.
    logits = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    if n > 1:
        labels[0] = int(torch.randint(0, v, (1,), generator=gen))  # at least one scored row
        labels[-1] = IGNORE  # and at least one fully masked row
    g = torch.randn(n, generator=gen)
    return logits.to(DEVICE), labels.to(DEVICE), g.to(DEVICE)


def _reference(logits: torch.Tensor, labels: torch.Tensor, g: torch.Tensor):
    x = logits.detach().double().requires_grad_()
    out = oracle.token_logps(x, labels, ignore_index=IGNORE)
    out.backward(g.double())
    return out.detach(), x.grad


def _check_against_reference(logits, labels, g, block_v=None):
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    out = triton_logps.token_logps(x, labels, ignore_index=IGNORE, block_v=block_v)
    out.backward(g)
    ref_out, ref_grad = _reference(logits, labels, g)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    t = TOL[dtype]
    assert_within("logps", out, ref_out, t["logps_atol"] + t["logps_rtol"] * ref_out.abs())
    assert_within("dlogits", x.grad, ref_grad, _grad_tol(dtype, ref_grad, labels, g))


# (N, V, block_v): block_v=None is the production rule (16 KB tiles: 8192 columns of bf16/fp16, 4096 of
# float32, the last one ragged);
# a small block_v runs the multi-tile online log-sum-exp with a ragged last tile on a small vocabulary.
SHAPES = [
    (1, 123, None),
    (47, 123, 32),  # 3 full tiles + 27
    (130, 1000, None),
    (47, 1000, 256),  # 3 full tiles + 232
    (3, 32003, None),  # 3 full 8192 tiles + 7427 (16-bit), 7 full 4096 tiles + 3331 (float32)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v,block_v", SHAPES)
def test_matches_reference(n, v, block_v, dtype):
    logits, labels, g = _make(n, v, dtype, seed=n * 100003 + v)
    _check_against_reference(logits, labels, g, block_v)


def test_ignored_rows_are_not_read():
    """Ignored rows give exactly 0 and a zero gradient row even when their logits are NaN (never read)."""
    logits, labels, g = _make(9, 123, torch.float32, seed=1, ignore_frac=0.5)
    logits[labels == IGNORE] = float("nan")
    x = logits.clone().requires_grad_()
    out = triton_logps.token_logps(x, labels, ignore_index=IGNORE, block_v=32)
    out.backward(g)
    ignored = labels == IGNORE
    assert bool(ignored.any()) and bool((~ignored).any())
    assert torch.equal(out[ignored], torch.zeros_like(out[ignored]))
    assert torch.equal(x.grad[ignored], torch.zeros_like(x.grad[ignored]))
    ref_out, ref_grad = _reference(logits[~ignored], labels[~ignored], g[~ignored])
    assert_within("logps", out[~ignored], ref_out, 1e-5 + 1e-5 * ref_out.abs())
    assert_within("dlogits", x.grad[~ignored], ref_grad,
                  _grad_tol(torch.float32, ref_grad, labels[~ignored], g[~ignored]))


def test_all_rows_ignored():
    logits = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    labels = torch.full((4,), IGNORE, device=DEVICE)
    out = triton_logps.token_logps(logits, labels, ignore_index=IGNORE)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4, device=DEVICE))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_other_ignore_index_and_int32_labels():
    """ignore_index is a runtime value (here 0, a valid id), labels may be int32."""
    logits, labels, g = _make(20, 77, torch.float32, seed=2, ignore_frac=0.0)
    labels[-1] = 5  # _make's masked row uses -100, which is out of range here
    labels[::3] = 0
    x = logits.clone().requires_grad_()
    out = triton_logps.token_logps(x, labels.int(), ignore_index=0)
    out.backward(g)
    xr = logits.double().requires_grad_()
    ref = oracle.token_logps(xr, labels, ignore_index=0)
    ref.backward(g.double())
    assert torch.equal(out[labels == 0], torch.zeros_like(out[labels == 0]))
    assert_within("logps", out, ref.detach(), 1e-5 + 1e-5 * ref.detach().abs())
    assert_within("dlogits", x.grad, xr.grad, 1e-5 * xr.grad.abs() + 16 * EPS32 * g.abs().max().double())


@pytest.mark.parametrize("layout", ["row_stride", "vocab_stride"])
def test_strided_views(layout):
    """A column slice (row stride > V) is used in place; a vocab stride != 1 is copied once."""
    gen = torch.Generator().manual_seed(3)
    big = (torch.randn(31, 2 * 101 + 7, generator=gen) * 4).to(DEVICE)
    view = big[:, 5:106] if layout == "row_stride" else big[:, ::2][:, :101]
    assert view.shape == (31, 101) and not view.is_contiguous()
    labels = torch.randint(0, 101, (31,), generator=gen).to(DEVICE)
    labels[4] = IGNORE
    g = torch.randn(31, generator=gen).to(DEVICE)
    _check_against_reference(view, labels, g, block_v=32)


def test_large_offset_is_stable():
    """The running max keeps exp() in range: logits around +-3000 must not overflow."""
    logits, labels, g = _make(8, 300, torch.float32, seed=4)
    shift = torch.tensor([3000.0, -3000.0] * 4, device=DEVICE).unsqueeze(1)
    x = (logits + shift).requires_grad_()
    out = triton_logps.token_logps(x, labels, ignore_index=IGNORE, block_v=64)
    out.backward(g)
    ref_out, ref_grad = _reference(x, labels, g)
    # |lse| ~ 3000 costs float32 ulps of 3000 (2.4e-4) in lse, hence in logps and in p's relative error.
    lse_err = 8 * EPS32 * 3000
    assert_within("logps", out, ref_out, lse_err + 1e-5 * ref_out.abs())
    assert_within("dlogits", x.grad, ref_grad, 2 * lse_err * ref_grad.abs() + 16 * EPS32 * g.abs().double()[:, None])


def test_out_of_range_label_gives_nan_not_a_read():
    logits = torch.randn(3, 40, device=DEVICE)
    labels = torch.tensor([1, 40, -7], device=DEVICE)
    out = triton_logps.token_logps(logits, labels, ignore_index=IGNORE)
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and torch.isnan(out[2])


def test_no_rows():
    logits = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    out = triton_logps.token_logps(logits, torch.zeros(0, dtype=torch.long, device=DEVICE), ignore_index=IGNORE)
    out.sum().backward()
    assert out.shape == (0,) and logits.grad.shape == (0, 10)


def test_bad_input_is_named():
    x = torch.randn(4, 10, device=DEVICE)
    y = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"logits must have shape \[N, V\]"):
        triton_logps.token_logps(x[None], y)
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        triton_logps.token_logps(x, y[:3])
    with pytest.raises(TypeError, match="labels must hold integer"):
        triton_logps.token_logps(x, y.float())
    with pytest.raises(TypeError, match="logits must be float32"):
        triton_logps.token_logps(x.int(), y)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        triton_logps.token_logps(x, y, block_v=48)


def test_block_rule():
    # 16 KB tiles: 8192 bf16/fp16 entries, 4096 float32; a small vocabulary rounded up to a power of two.
    assert triton_logps.default_block_v(123, 2) == 128
    assert triton_logps.default_block_v(32003, 2) == 8192
    assert triton_logps.default_block_v(32003, 4) == 4096
    assert triton_logps.default_block_v(1, 4) == 1
    # Warps by tile bytes: four 16-byte vectors per thread, 1 to 8 warps.
    assert triton_logps.num_warps_for(8192, 2) == 8
    assert triton_logps.num_warps_for(4096, 4) == 8
    assert triton_logps.num_warps_for(1024, 2) == 1
    assert triton_logps.num_warps_for(128, 2) == 1


def test_torch_compile_traces_without_graph_break():
    """fullgraph=True fails on any graph break; aot_eager also runs the fake kernel and the autograd formula."""
    logits, labels, g = _make(11, 77, torch.float32, seed=5)

    def loss(x, y):
        return (triton_logps.token_logps(x, y, ignore_index=IGNORE) * g).sum()

    x = logits.clone().requires_grad_()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    compiled(x, labels).backward()
    ref_out, ref_grad = _reference(logits, labels, g)
    assert_within("dlogits", x.grad, ref_grad, _grad_tol(torch.float32, ref_grad, labels, g))


_COMPILED_MODE_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from dpo_fast.loss.ops import triton_logps
assert triton_logps._COMPILED, "kernels were interpreted"

def step(x, y, g):
    x = x.detach().requires_grad_()
    out = triton_logps.token_logps(x, y, ignore_index=-100)
    (dx,) = torch.autograd.grad(out, x, g)
    return out, dx

x = torch.randn(7, 300, dtype=torch.bfloat16)
gm = make_fx(step, tracing_mode="symbolic")(x, torch.randint(0, 300, (7,)), torch.randn(7))
ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
assert "dpo_fast.token_logps_fwd.default" in ops and "dpo_fast.token_logps_bwd.default" in ops, ops
out, dx = (n.meta["val"] for n in gm.graph.find_nodes(op="output")[0].args[0])
assert out.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dx.dim() == 2, (out, dx)
print("traced")
"""


def test_compiled_mode_op_traces_with_fake_tensors():
    """Compiled Triton registers a triton_op; tracing it with fake tensors (what torch.compile does before
    any launch) needs no GPU, so it is checked here in a child process without the interpreter."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILED_MODE_TRACE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-3000:]


# ---- through the public API ------------------------------------------------------------------------


def _api_inputs(dtype, seed, b=2, t=13, v=123):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * b, t, v, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    labels[:, :3] = IGNORE  # prompt
    labels[1, 9:] = IGNORE  # padding of a shorter response
    labels[2, 11:] = IGNORE
    ref_c = torch.randn(b, generator=gen) * 5 - 20
    ref_r = torch.randn(b, generator=gen) * 5 - 20
    return logits.to(DEVICE), labels.to(DEVICE), ref_c.to(DEVICE), ref_r.to(DEVICE)


def _api_grad_tol(dtype, ref_grad):
    # The per-token coefficient comes from pair-level float32 maths here, so bound the target-column
    # cancellation by float32 ulps of the largest gradient entry instead of per-row |g|.
    finfo = torch.finfo(dtype)
    floor = 16 * EPS32 * ref_grad.abs().max() + finfo.smallest_normal * finfo.eps
    return TOL[dtype]["grad_rtol"] * ref_grad.abs() + floor


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_api(dtype, average):
    logits, labels, _, _ = _api_inputs(dtype, seed=6)
    x = logits.clone().requires_grad_()
    out = dpo_fast.sequence_logps(x, labels, average=average, backend="triton")
    w = torch.linspace(-1, 2, out.shape[0], device=DEVICE)
    (out * w).sum().backward()
    xr = logits.double().requires_grad_()
    ref = oracle.sequence_logps(xr, labels, average=average)
    (ref * w.double()).sum().backward()
    assert out.dtype == torch.float32
    # A sum of <= 13 token log-probs, each within 1e-5 relative of |lse| ~ 10.
    assert_within("sequence_logps", out, ref.detach(), 1e-4 + 1e-5 * ref.detach().abs())
    assert_within("dlogits", x.grad, xr.grad, _api_grad_tol(dtype, xr.grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_fused_dpo_loss_api(dtype, loss_type, form):
    logits, labels, ref_c, ref_r = _api_inputs(dtype, seed=7)
    kwargs = dict(beta=0.1, loss_type=loss_type)
    if form == "padded":
        inputs, lab, seg = logits, labels, None
    else:
        # Packed: the 4 rows end to end; each row's scored tokens form sequence = row index.
        inputs = logits.reshape(-1, logits.shape[-1])
        lab = labels.reshape(-1)
        rows = torch.arange(labels.shape[0], device=DEVICE).repeat_interleave(labels.shape[1])
        seg = torch.where(lab != IGNORE, rows, -1)
    x = inputs.clone().requires_grad_()
    out = dpo_fast.fused_dpo_loss(x, lab, ref_c, ref_r, segment_ids=seg, backend="triton", **kwargs)
    out.loss.backward()
    xr = inputs.double().requires_grad_()
    ref = oracle.fused_dpo_loss(xr, lab, ref_c, ref_r, segment_ids=seg, **kwargs)
    ref.loss.backward()
    assert_within("chosen_logps", out.chosen_logps, ref.chosen_logps.detach(),
                  1e-4 + 1e-5 * ref.chosen_logps.detach().abs())
    assert_within("rejected_logps", out.rejected_logps, ref.rejected_logps.detach(),
                  1e-4 + 1e-5 * ref.rejected_logps.detach().abs())
    assert_within("loss", out.loss.detach(), ref.loss.detach(), 1e-5 + 1e-4 * ref.loss.detach().abs())
    assert_within("dlogits", x.grad, xr.grad, _api_grad_tol(dtype, xr.grad))


# ---- on a GPU, at real shapes ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,v", [(4096, 128256), (64, 151936), (33, 262144)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_real_shapes(n, v, dtype):
    gen = torch.Generator(device="cuda").manual_seed(8)
    logits = (torch.randn(n, v, device="cuda", generator=gen) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    labels[::7] = IGNORE
    g = torch.randn(n, device="cuda", generator=gen)
    x = logits.clone().requires_grad_()
    out = triton_logps.token_logps(x, labels, ignore_index=IGNORE)
    out.backward(g)
    # The float64 reference of [4096, 128256] is 4 GB per tensor: check in slices of rows.
    t = TOL[dtype]
    for s in range(0, n, 512):
        rows = slice(s, min(s + 512, n))
        ref_out, ref_grad = _reference(logits[rows], labels[rows], g[rows])
        assert_within("logps", out[rows], ref_out, t["logps_atol"] + t["logps_rtol"] * ref_out.abs())
        assert_within("dlogits", x.grad[rows], ref_grad, _grad_tol(dtype, ref_grad, labels[rows], g[rows]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offsets_past_int32():
    """17000 x 128256 = 2.18e9 elements: the last rows start past 2^31 and need int64 offsets."""
    n, v = 17000, 128256
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    x = logits.requires_grad_()
    out = triton_logps.token_logps(x, labels, ignore_index=IGNORE)
    out.backward(g)
    rows = slice(n - 16, n)
    ref_out, ref_grad = _reference(logits[rows], labels[rows], g[rows])
    t = TOL[torch.bfloat16]
    assert_within("logps", out[rows], ref_out, t["logps_atol"] + t["logps_rtol"] * ref_out.abs())
    assert_within("dlogits", x.grad[rows], ref_grad, _grad_tol(torch.bfloat16, ref_grad, labels[rows], g[rows]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inductor_compiles_triton_op():
    logits, labels, g = _make(257, 32003, torch.bfloat16, seed=9)

    def loss(x, y):
        return (triton_logps.token_logps(x, y, ignore_index=IGNORE) * g).sum()

    x = logits.clone().requires_grad_()
    torch.compile(loss, fullgraph=True)(x, labels).backward()
    ref_out, ref_grad = _reference(logits, labels, g)
    assert_within("dlogits", x.grad, ref_grad, _grad_tol(torch.bfloat16, ref_grad, labels, g))


# ---------------------------------------------------------------- GPU code generation, without a GPU

_PTX_FOR_SM90 = r"""
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dpo_fast.kernels import logps
from dpo_fast.loss.ops import triton_logps

assert isinstance(logps._token_logps_fwd, triton.runtime.jit.JITFunction), "still interpreted"
dtype, itemsize, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block_v = triton_logps.default_block_v(vocab, itemsize)
for name in ("_token_logps_fwd", "_token_logps_bwd"):
    fn = getattr(logps, name)
    # The naming convention gives the types: BLOCK_V constexpr, Capitalised = pointer, else int (V too).
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg == "BLOCK_V":
            sig[arg] = "constexpr"
        elif arg[0].isupper() and not arg.isupper():
            sig[arg] = {"Logits": "*" + dtype, "DLogits": "*" + dtype, "Labels": "*i64"}.get(arg, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        else:
            sig[arg] = "i32"
            if arg in ("stride_row", "V") and vocab % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton's launcher specialises on
    src = ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_V": block_v}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=triton_logps.num_warps_for(block_v, itemsize)))
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"\bld\.global[\w.:]*", ptx)  # predicated ones too (`@%p1 ld.global...`)
    stores = re.findall(r"\bst\.global[\w.:]*", ptx)
    print(name, "loads", sorted(set(loads)), "stores", sorted(set(stores)))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
@pytest.mark.parametrize("dtype,itemsize", [("bf16", 2), ("fp32", 4)])
def test_aligned_vocab_compiles_to_128_bit_accesses(dtype, itemsize):
    """sm_90 PTX, offline: at Llama-3's 128256 vocabulary (a multiple of 16) the streaming loads and the
    gradient's stores must be 128-bit vectors (`ld.global...v4.b32`: 8 bf16 or 4 float32 per access);
    16-bit accesses would cap the kernels far below copy bandwidth."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PTX_FOR_SM90, dtype, str(itemsize), "128256"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith("_token_logps"))
    assert set(lines) == {"_token_logps_fwd", "_token_logps_bwd"}, done.stdout
    for name, accesses in lines.items():
        assert ".v4.b32" in accesses.split("stores")[0], f"{name}: no 128-bit load in {accesses}"
    assert ".v4.b32" in lines["_token_logps_bwd"].split("stores")[1], lines["_token_logps_bwd"]
