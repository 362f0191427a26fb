"""Pair-level loss formulas.

Each formula is checked against a scalar re-derivation with the `math` module, written from the papers'
definitions (not from `dpo_fast.loss.formulas`), on random log-probs: with rho = log pi - log pi_ref and
delta = rho_c - rho_r, e.g. the DPO loss is -log sigmoid(beta * delta), so for beta = 0.1, rho_c = 1 and
rho_r = -1 it is -log sigmoid(0.2) = 0.5981. Gradients are checked with float64 gradcheck.
"""

import math

import pytest
import torch

from dpo_fast import LOSS_TYPES, dpo_loss


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def scalar_loss(kind, rc, rr, beta, e, gamma, tau):
    """One pair's loss from its log-ratios (already length-normalised where the loss asks for it)."""
    d = rc - rr
    z = beta * d
    if kind in ("sigmoid", "sigmoid_norm"):
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if kind == "hinge":
        return max(0.0, 1 - z)
    if kind == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e)
    if kind == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e))
    if kind == "nca_pair":
        return -logsig(beta * rc) - 0.5 * logsig(-beta * rc) - 0.5 * logsig(-beta * rr)
    if kind == "bco_pair":
        return -logsig(beta * rc) - logsig(-beta * rr)
    if kind == "sppo_hard":
        return (rc - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return 1 - sig(beta * rc) + sig(beta * rr)
    if kind == "apo_down":
        return sig(beta * rc) + 1 - sig(z)
    if kind == "discopop":
        m = sig(z / tau)
        return -logsig(z) * (1 - m) + math.exp(-z) * m
    if kind == "simpo":
        return -(1 - e) * logsig(z - gamma) - e * logsig(-(z - gamma))
    raise KeyError(kind)


def smoothing_for(kind):
    return {"exo_pair": 0.1, "robust": 0.2, "sigmoid": 0.15, "simpo": 0.05, "aot": 0.1}.get(kind, 0.0)


def make_batch(b, seed):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(b, generator=g, dtype=torch.float64) * 40
    pr = -torch.rand(b, generator=g, dtype=torch.float64) * 40
    rc = -torch.rand(b, generator=g, dtype=torch.float64) * 40
    rr = -torch.rand(b, generator=g, dtype=torch.float64) * 40
    lc = torch.randint(1, 30, (b,), generator=g)
    lr = torch.randint(1, 30, (b,), generator=g)
    return pc, pr, rc, rr, lc, lr


PER_PAIR = [k for k in LOSS_TYPES if k not in ("aot", "aot_unpaired")]


@pytest.mark.parametrize("kind", PER_PAIR)
def test_per_pair_formulas_match_scalar_derivation(kind):
    pc, pr, rc, rr, lc, lr = make_batch(5, seed=hash(kind) % 1000)
    beta, gamma, tau = 0.3, 0.7, 0.05
    e = smoothing_for(kind)
    ref = (None, None) if kind == "simpo" else (rc, rr)
    out = dpo_loss(pc, pr, *ref, beta=beta, loss_type=kind, label_smoothing=e, chosen_lengths=lc,
                   rejected_lengths=lr, simpo_gamma=gamma, discopop_tau=tau)
    expected = []
    for i in range(5):
        xc = float(pc[i]) - (0.0 if kind == "simpo" else float(rc[i]))
        xr = float(pr[i]) - (0.0 if kind == "simpo" else float(rr[i]))
        if kind in ("ipo", "sigmoid_norm", "simpo"):
            xc, xr = xc / int(lc[i]), xr / int(lr[i])
        expected.append(scalar_loss(kind, xc, xr, beta, e, gamma, tau))
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=torch.float64).mean(), rtol=1e-12, atol=1e-12)


def test_dpo_paper_value():
    out = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
    assert abs(float(out.loss) - (-math.log(1 / (1 + math.exp(-0.2))))) < 1e-6
    assert abs(float(out.loss) - 0.598139) < 1e-6
    assert float(out.chosen_rewards) == pytest.approx(0.1) and float(out.rejected_rewards) == pytest.approx(-0.1)


def test_batch_coupled_losses():
    pc, pr, rc, rr, _, _ = make_batch(6, seed=3)
    beta, e = 0.2, 0.1
    # aot: sorted policy gaps matched with sorted reference gaps.
    pol = sorted((pc - pr).tolist())
    refg = sorted((rc - rr).tolist())
    exp = [-(1 - e) * logsig(beta * (a - b)) - e * logsig(-beta * (a - b)) for a, b in zip(pol, refg)]
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="aot", label_smoothing=e)
    assert float(out.loss) == pytest.approx(sum(exp) / 6, rel=1e-12)
    # aot_unpaired: sorted chosen log-ratios matched with sorted rejected log-ratios.
    xc = sorted((pc - rc).tolist())
    xr = sorted((pr - rr).tolist())
    exp = [-logsig(beta * (a - b)) for a, b in zip(xc, xr)]
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="aot_unpaired")
    assert float(out.loss) == pytest.approx(sum(exp) / 6, rel=1e-12)


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_gradients_gradcheck(kind):
    pc, pr, rc, rr, lc, lr = make_batch(3, seed=11)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    ref = (None, None) if kind == "simpo" else (rc, rr)
    kw = dict(beta=0.2, loss_type=kind, label_smoothing=smoothing_for(kind), chosen_lengths=lc, rejected_lengths=lr)
    # hinge has a kink at beta * delta = 1; these inputs stay away from it.
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, *ref, **kw).loss, (pc, pr))


def test_nll_term_adds_mean_chosen_nll():
    pc, pr, rc, rr, lc, lr = make_batch(4, seed=5)
    base = dpo_loss(pc, pr, rc, rr, beta=0.1)
    rpo = dpo_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.5, chosen_lengths=lc)
    torch.testing.assert_close(rpo.losses - base.losses, 0.5 * (-pc / lc))
    nll = torch.rand(4, dtype=torch.float64)
    given = dpo_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.5, chosen_nll=nll)
    torch.testing.assert_close(given.losses - base.losses, 0.5 * nll)


def test_reference_free_equals_zero_reference():
    pc, pr, _, _, _, _ = make_batch(4, seed=7)
    z = torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(pc, pr).losses, dpo_loss(pc, pr, z, z).losses)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="nope"), "loss_type='nope' is not known"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing must be < 0.5"),
        (dict(loss_type="exo_pair"), "label_smoothing must be > 0 for loss_type='exo_pair'"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing=0.1 has no effect"),
        (dict(loss_type="ipo"), "chosen_lengths and rejected_lengths are required"),
        (dict(beta=0.0), "beta must be"),
        (dict(nll_weight=1.0), "nll_weight > 0 needs chosen_nll or chosen_lengths"),
        (dict(loss_type="simpo", with_ref=True), "reference-free"),
    ],
)
def test_invalid_configurations(kwargs, match):
    pc, pr, rc, rr, _, _ = make_batch(2, seed=1)
    with_ref = kwargs.pop("with_ref", True)
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc if with_ref else None, rr if with_ref else None, **kwargs)


def test_zero_length_row_named():
    pc, pr, rc, rr, _, _ = make_batch(3, seed=2)
    with pytest.raises(ValueError, match=r"rejected_lengths\[1\] = 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.tensor([3, 4, 5]),
                 rejected_lengths=torch.tensor([2, 0, 1]))


def test_shape_mismatch_named():
    pc, pr, rc, rr, _, _ = make_batch(3, seed=2)
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have shape \(3,\)"):
        dpo_loss(pc, pr, rc, rr[:2])
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        dpo_loss(pc, pr, rc, None)


def test_rewards_are_whole_response_log_ratios():
    pc, pr, rc, rr, lc, lr = make_batch(3, seed=8)
    out = dpo_loss(pc, pr, rc, rr, beta=0.4, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(out.chosen_rewards, 0.4 * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, 0.4 * (pr - rr))


def test_rewards_are_detached_and_loss_has_grad():
    pc = torch.randn(3, requires_grad=True)
    out = dpo_loss(pc, torch.randn(3), torch.randn(3), torch.randn(3))
    assert out.loss.requires_grad and not out.chosen_rewards.requires_grad
