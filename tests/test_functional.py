"""The public API on the torch backend against the float64 oracle (`dpo_fast.loss.oracle`).

Triton backends have their own test modules that reuse the same oracle.
"""

import pytest
import torch

import dpo_fast
from dpo_fast.loss import oracle
from tests.helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # (pairs B, tokens T, vocab V, hidden H): random odd shapes
    (1, 1, 123, 16),
    (3, 47, 1000, 24),
    (2, 13, 32003, 8),
]


def loss_kwargs(kind):
    kw = dict(loss_type=kind, beta=0.2)
    if kind in ("exo_pair", "robust"):
        kw["label_smoothing"] = 0.1
    return kw


def make_labels(b, t, v, seed, mask_row=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    prompt = torch.randint(0, max(t // 2, 1), (2 * b,), generator=g)
    labels[torch.arange(t) < prompt[:, None]] = -100  # prompt positions are not scored
    labels[:, -1] = torch.where(torch.rand(2 * b, generator=g) < 0.5, -100, labels[:, -1])  # right padding
    if mask_row and b > 1:
        labels[1] = -100  # a fully masked row
    labels[0, -1] = int(torch.randint(0, v, (1,), generator=g))  # at least one scored token in row 0
    return labels


def refs(b, seed):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(b, generator=g) * 20, -torch.rand(b, generator=g) * 20


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,v,h", SHAPES)
def test_fused_dpo_loss_forward_and_grad(dtype, b, t, v, h):
    torch.manual_seed(b * 100 + t)
    logits = (torch.randn(2 * b, t, v) * 3).to(dtype).requires_grad_(True)
    labels = make_labels(b, t, v, seed=t)
    rc, rr = refs(b, seed=v)
    out = dpo_fast.fused_dpo_loss(logits, labels, rc, rr, backend="torch")
    (grad,) = torch.autograd.grad(out.loss, logits)
    x64 = logits.detach().double().requires_grad_(True)
    exp = oracle.fused_dpo_loss(x64, labels, rc.double(), rr.double())
    (grad64,) = torch.autograd.grad(exp.loss, x64)
    assert grad.dtype == dtype
    assert_close(out.chosen_logps, exp.chosen_logps, torch.float32, "chosen_logps")
    assert_close(out.rejected_logps, exp.rejected_logps, torch.float32, "rejected_logps")
    assert_close(out.losses, exp.losses, torch.float32, "losses")
    assert_close(grad, grad64, dtype, "dlogits")


@pytest.mark.parametrize("kind", dpo_fast.LOSS_TYPES)
def test_every_loss_type_fused_and_linear(kind):
    b, t, v, h = 3, 11, 157, 20
    torch.manual_seed(7)
    labels = make_labels(b, t, v, seed=3, mask_row=kind not in ("ipo", "sigmoid_norm", "simpo"))
    hidden = torch.randn(2 * b, t, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_(True)
    bias = torch.randn(v, requires_grad=True)
    kw = loss_kwargs(kind)
    rc = rr = None
    if kind != "simpo":
        # A reference close to the policy, as at the start of training, keeps every loss in its
        # sensitive region (hinge inside its margin, sppo_hard near its targets).
        with torch.no_grad():
            start = oracle.linear_dpo_loss(hidden, weight, labels, bias=bias, dtype=None)
        g = torch.Generator().manual_seed(5)
        rc = start.chosen_logps + torch.randn(b, generator=g)
        rr = start.rejected_logps + torch.randn(b, generator=g)
    out = dpo_fast.linear_dpo_loss(hidden, weight, labels, rc, rr, bias=bias, backend="torch", **kw)
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    rc64 = None if rc is None else rc.double()
    rr64 = None if rr is None else rr.double()
    exp = oracle.linear_dpo_loss(leaves[0], leaves[1], labels, rc64, rr64, bias=leaves[2], **kw)
    grads64 = torch.autograd.grad(exp.loss, leaves)
    assert_close(out.losses, exp.losses, torch.float32, "losses")
    assert_close(out.chosen_rewards, exp.chosen_rewards, torch.float32, "chosen_rewards")
    for name, g, g64 in zip(("dhidden", "dweight", "dbias"), grads, grads64):
        assert float(g64.abs().max()) > 1e-3, f"{name} is ~0: the test would not see a wrong gradient"
        assert_close(g, g64, torch.float32, name)
    # The logits-in path gives the same numbers.
    logits = (hidden @ weight.T + bias).detach().requires_grad_(True)
    out2 = dpo_fast.fused_dpo_loss(logits, labels, rc, rr, backend="torch", **kw)
    assert_close(out2.losses, exp.losses, torch.float32, "fused losses")


def pack(labels, values):
    """Padded [2B, T, D] -> packed [N, D] keeping only scored tokens plus some unscored filler."""
    rows, t = labels.shape
    keep = labels != -100
    keep[:, 0] = True  # unscored tokens inside the packed stream too
    seg = torch.arange(rows)[:, None].expand(rows, t)
    seg = torch.where(labels != -100, seg, -1)
    order = torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(0))
    return values[keep][order], labels[keep][order], seg[keep][order]


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "aot"])
def test_packed_equals_padded(kind):
    b, t, v, h = 3, 17, 211, 12
    torch.manual_seed(1)
    labels = make_labels(b, t, v, seed=9, mask_row=False)
    hidden = torch.randn(2 * b, t, h)
    weight = torch.randn(v, h) * 0.2
    rc, rr = refs(b, seed=2)
    kw = loss_kwargs(kind)
    hp, lp, sp = pack(labels, hidden)
    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    padded = dpo_fast.linear_dpo_loss(h1, w1, labels, rc, rr, backend="torch", **kw)
    padded.loss.backward()
    h2 = hp.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    packed = dpo_fast.linear_dpo_loss(h2, w2, lp, rc, rr, segment_ids=sp, backend="torch", **kw)
    packed.loss.backward()
    torch.testing.assert_close(packed.losses, padded.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)
    _, _, _ = pack(labels, h1.grad)
    torch.testing.assert_close(h2.grad, pack(labels, h1.grad)[0], rtol=1e-5, atol=1e-6)


def test_ref_hidden_in_the_same_call():
    b, t, v, h = 2, 9, 97, 16
    torch.manual_seed(4)
    labels = make_labels(b, t, v, seed=4, mask_row=False)
    hidden, ref_hidden = torch.randn(2 * b, t, h), torch.randn(2 * b, t, h)
    weight, ref_weight = torch.randn(v, h), torch.randn(v, h)
    out = dpo_fast.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                   backend="torch")
    exp = oracle.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    assert_close(out.losses, exp.losses, torch.float32, "losses")
    assert_close(out.chosen_rewards, exp.chosen_rewards, torch.float32, "chosen_rewards")


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(average):
    torch.manual_seed(0)
    logits = torch.randn(5, 19, 301, dtype=torch.bfloat16)
    labels = make_labels(2, 19, 301, seed=0)[:4]
    labels = torch.cat([labels, torch.full((1, 19), -100)])  # an odd row count is fine here
    got = dpo_fast.sequence_logps(logits, labels, average=average, backend="torch")
    exp = oracle.sequence_logps(logits, labels, average=average)
    assert got.dtype == torch.float32
    assert_close(got, exp, torch.float32, "sequence_logps")
    assert float(got[-1]) == 0.0


def test_module_matches_functional():
    torch.manual_seed(0)
    b, t, v, h = 2, 5, 50, 8
    hidden, weight = torch.randn(2 * b, t, h), torch.randn(v, h)
    labels = make_labels(b, t, v, seed=1, mask_row=False)
    module = dpo_fast.DPOLoss(beta=0.3, loss_type="hinge", backend="torch")
    a = module(hidden, weight, labels)
    c = dpo_fast.linear_dpo_loss(hidden, weight, labels, beta=0.3, loss_type="hinge", backend="torch")
    torch.testing.assert_close(a.losses, c.losses)
    logits = hidden @ weight.T
    torch.testing.assert_close(module.from_logits(logits, labels).losses, c.losses, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_fast.DPOLoss(loss_type="dpo")


def test_auto_backend_on_cpu_is_torch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 30, requires_grad=True)
    labels = torch.randint(0, 30, (2, 4))
    a = dpo_fast.fused_dpo_loss(logits, labels)
    c = dpo_fast.fused_dpo_loss(logits, labels, backend="torch")
    torch.testing.assert_close(a.loss, c.loss)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(3, 4, 10), torch.randint(0, 10, (3, 4)), {}), ValueError, "2B rows"),
        (lambda: (torch.randn(2, 4, 10), torch.randint(0, 10, (2, 5)), {}), ValueError,
         r"labels must have shape \[2, 4\]"),
        (lambda: (torch.randint(0, 5, (2, 4, 10)), torch.randint(0, 10, (2, 4)), {}), TypeError,
         "logits must be float"),
        (lambda: (torch.randn(2, 4, 10), torch.full((2, 4), 10), {}), ValueError,
         r"labels\[0, 0\] = 10 is outside \[0, 10\)"),
        (lambda: (torch.randn(2, 4, 10), torch.full((2, 4), -5), {}), ValueError, "not ignore_index=-100"),
        (lambda: (torch.randn(2, 4, 10), torch.randint(0, 10, (2, 4)).float(), {}), TypeError, "integer token ids"),
        (lambda: (torch.randn(6, 10), torch.randint(0, 10, (6,)), {"segment_ids": torch.tensor([0, 0, 1, 1, 2, 2])}),
         ValueError, "expected an even count"),
        (lambda: (torch.randn(6, 10), torch.randint(0, 10, (6,)), {"segment_ids": torch.tensor([0, 1])}),
         ValueError, r"segment_ids must have shape \[6\]"),
        (lambda: (torch.randn(6, 10), torch.randint(0, 10, (6,)), {}), ValueError, r"\[2B, T, D\]"),
        (lambda: (torch.randn(2, 4, 10), torch.randint(0, 10, (2, 4)), {"backend": "cuda"}), ValueError, "backend="),
        (lambda: (torch.randn(2, 4, 10), torch.randint(0, 10, (2, 4)), {"loss_type": "ipo", "labels_row": 1}),
         ValueError, r"rejected_lengths\[0\] = 0"),
    ],
)
def test_bad_input_fused(make, exc, match):
    logits, labels, kw = make()
    row = kw.pop("labels_row", None)
    if row is not None:
        labels[row] = -100
    with pytest.raises(exc, match=match):
        dpo_fast.fused_dpo_loss(logits, labels, **kw)


def test_bad_input_linear():
    hidden, labels = torch.randn(2, 4, 8), torch.randint(0, 10, (2, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, 8\]"):
        dpo_fast.linear_dpo_loss(hidden, torch.randn(10, 7), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \[10\]"):
        dpo_fast.linear_dpo_loss(hidden, torch.randn(10, 8), labels, bias=torch.randn(9))
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[1\]"):
        dpo_fast.linear_dpo_loss(hidden, torch.randn(10, 8), labels, torch.randn(2), torch.randn(2))
    with pytest.raises(TypeError, match="weight is torch.bfloat16 but hidden is torch.float32"):
        dpo_fast.linear_dpo_loss(hidden, torch.randn(10, 8).bfloat16(), labels)
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 10"):
        bad = labels.clone()
        bad[1, 2] = 10
        dpo_fast.linear_dpo_loss(hidden, torch.randn(10, 8), bad)


def test_triton_backend_off_gpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dpo_fast.fused_dpo_loss(torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3)), backend="triton")


def test_linear_sequence_logps_rows_and_packed():
    torch.manual_seed(3)
    hidden = torch.randn(3, 10, 12, requires_grad=True)
    weight = torch.randn(77, 12, requires_grad=True)
    labels = make_labels(2, 10, 77, seed=6)[:3]
    logps, lengths = dpo_fast.linear_sequence_logps(hidden, weight, labels, backend="torch")
    exp = oracle.sequence_logps(hidden.double() @ weight.double().T, labels)
    assert_close(logps, exp, torch.float32, "logps")
    assert lengths.tolist() == (labels != -100).sum(-1).tolist()
    (g,) = torch.autograd.grad(logps.sum(), hidden)
    (g64,) = torch.autograd.grad(exp.sum(), hidden)
    assert_close(g, g64, torch.float32, "dhidden")
    # Packed form with an odd number of sequences is fine here (no pairs involved).
    seg = torch.tensor([0, 0, 1, -1, 2, 2])
    lab = torch.randint(0, 77, (6,))
    h = torch.randn(6, 12)
    logps, lengths = dpo_fast.linear_sequence_logps(h, weight, lab, segment_ids=seg, backend="torch")
    exp, exp_len = oracle.packed_sequence_logps(h @ weight.T, lab, seg, 3)
    assert_close(logps, exp, torch.float32, "packed logps")
    assert lengths.tolist() == exp_len.tolist() == [2, 1, 2]


def test_nothing_scored_gives_zero_logps_and_zero_grads():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((2, 4), -100)
    out = dpo_fast.linear_dpo_loss(hidden, weight, labels, backend="torch")
    out.loss.backward()
    assert out.chosen_logps.tolist() == [0.0] and abs(float(out.loss) - 0.6931471805599453) < 1e-6
    assert float(hidden.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0
