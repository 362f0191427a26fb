"""Pair-level DPO loss formulas: from per-sequence log-probs to per-pair losses.

Everything here works on `[B]` vectors (one value per preference pair), so it is plain torch: the
heavy lifting (log-softmax over the vocabulary, gathers, per-sequence sums) happens in the fused
ops that produce the log-probs. Autograd carries the per-pair gradient back into those ops, whose
backward scales each token's `onehot - softmax` by its sequence's coefficient.

Notation (TRL's): rho = policy log-prob minus reference log-prob of a response (the log-ratio),
delta = rho_chosen - rho_rejected. Reference-free (`ref_*=None`) means rho = the policy log-prob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
)

# Losses whose log-ratios are normalised by the number of scored tokens of each response.
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm", "simpo"})
# Losses that read `label_smoothing`; for the others a non-zero value is a configuration mistake.
USES_LABEL_SMOOTHING = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"})
# Losses defined without a reference model.
REFERENCE_FREE = frozenset({"simpo"})
# Losses where pair i's gradient depends on pair i alone (no sort or batch statistic across pairs):
# these admit one-pass schedules that finish a pair's gradient as soon as the pair is seen.
PAIR_SEPARABLE = frozenset(LOSS_TYPES) - {"aot", "aot_unpaired"}


@dataclass(frozen=True)
class DPOOutput:
    """Result of a DPO loss.

    loss: scalar, mean of `losses` over pairs (the only field meant to be backpropagated).
    losses: [B] per-pair losses.
    chosen_logps / rejected_logps: [B] summed log-probs of the responses under the policy.
    chosen_rewards / rejected_rewards: [B] implicit rewards r = beta * (log pi - log pi_ref) of the whole
        response (not length-normalised, as TRL reports them), detached.
    """

    loss: Tensor
    losses: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class LossConfig:
    """The loss keywords shared by every public loss function, validated once."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    simpo_gamma: float = 0.0
    discopop_tau: float = 0.05

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not known; expected one of {', '.join(LOSS_TYPES)}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        e = self.label_smoothing
        if not (0.0 <= e < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {e!r}")
        if e > 0 and self.loss_type not in USES_LABEL_SMOOTHING:
            raise ValueError(
                f"label_smoothing={e} has no effect with loss_type={self.loss_type!r}; it is used by "
                f"{', '.join(sorted(USES_LABEL_SMOOTHING))}"
            )
        if self.loss_type == "robust" and e >= 0.5:
            raise ValueError(f"label_smoothing must be < 0.5 for loss_type='robust', got {e}")
        if self.loss_type == "exo_pair" and e == 0:
            raise ValueError(
                "label_smoothing must be > 0 for loss_type='exo_pair' (it is the EXO epsilon; 1e-3 is usual)")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight!r}")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau!r}")

    @property
    def needs_lengths(self) -> bool:
        return self.loss_type in LENGTH_NORMALISED or self.nll_weight > 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> LossConfig:
        return cls(**kwargs)


def _check_vector(name: str, t: Tensor | None, like: Tensor | None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B] (one value per pair), got {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)} like chosen_logps, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but chosen_logps is on {like.device}")


def _check_lengths(name: str, lengths: Tensor | None, loss_type: str) -> None:
    if lengths is None:
        return
    bad = (lengths <= 0).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"{name}[{row}] = {int(lengths[row])}: a sequence with no scored tokens cannot be length-normalised "
            f"(loss_type={loss_type!r}); drop the pair or fix its labels"
        )


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    nll_weight: float = 0.0,
    chosen_nll: Tensor | None = None,
    simpo_gamma: float = 0.0,
    discopop_tau: float = 0.05,
) -> DPOOutput:
    """DPO-family loss from per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: [B] summed log-probs of the chosen / rejected responses.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model, or None for a
            reference-free loss (the log-ratio is then the policy log-prob alone).
        chosen_lengths, rejected_lengths: [B] number of scored tokens, needed by the length-normalised
            losses (ipo, sigmoid_norm, simpo) and by `nll_weight` without `chosen_nll`.
        nll_weight: weight of the RPO term, the per-token mean NLL of the chosen responses
            (`chosen_nll`, or -chosen_logps / chosen_lengths when it is None).
        Other keywords: see `LossConfig` and the loss formulas in `pair_losses`.

    Returns:
        DPOOutput with `loss` the mean over pairs.
    """
    config = LossConfig(
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        nll_weight=nll_weight,
        simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau,
    )
    return loss_from_logps(
        config, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
    )


def loss_from_logps(
    config: LossConfig,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
) -> DPOOutput:
    """`dpo_loss` with an already validated `LossConfig` (what the fused ops call)."""
    _check_vector("chosen_logps", chosen_logps, None)
    if not chosen_logps.is_floating_point():
        raise TypeError(f"chosen_logps must be a floating-point tensor, got {chosen_logps.dtype}")
    if chosen_logps.numel() == 0:
        raise ValueError("chosen_logps is empty: a DPO loss needs at least one pair")
    for name, t in (
        ("rejected_logps", rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
        ("chosen_nll", chosen_nll),
    ):
        _check_vector(name, t, chosen_logps)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    loss_type = config.loss_type
    if loss_type in REFERENCE_FREE and ref_chosen_logps is not None:
        raise ValueError(f"loss_type={loss_type!r} is reference-free: pass ref_chosen_logps=None")
    if loss_type in LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type={loss_type!r} is length-normalised: chosen_lengths and rejected_lengths are required")
    if config.nll_weight > 0 and chosen_nll is None and chosen_lengths is None:
        raise ValueError("nll_weight > 0 needs chosen_nll or chosen_lengths (to average the chosen NLL per token)")
    if loss_type in LENGTH_NORMALISED:
        _check_lengths("chosen_lengths", chosen_lengths, loss_type)
        _check_lengths("rejected_lengths", rejected_lengths, loss_type)
    if config.nll_weight > 0 and chosen_nll is None:
        _check_lengths("chosen_lengths", chosen_lengths, "nll_weight > 0")

    # Pair-level maths in at least float32: bf16 log-probs of long sequences lose their last digits.
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    pc = chosen_logps.to(dtype)
    pr = rejected_logps.to(dtype)
    rc = pc if ref_chosen_logps is None else pc - ref_chosen_logps.to(dtype)
    rr = pr if ref_rejected_logps is None else pr - ref_rejected_logps.to(dtype)
    chosen_rewards, rejected_rewards = (config.beta * rc).detach(), (config.beta * rr).detach()
    if loss_type in LENGTH_NORMALISED:
        rc = rc / chosen_lengths.to(dtype)
        rr = rr / rejected_lengths.to(dtype)

    if ref_chosen_logps is None:
        reference_gap = torch.zeros_like(pc)
    else:
        reference_gap = (ref_chosen_logps.to(dtype) - ref_rejected_logps.to(dtype)).detach()
    losses = pair_losses(config, rc, rr, reference_gap)
    if config.nll_weight > 0:
        nll = chosen_nll.to(dtype) if chosen_nll is not None else -pc / chosen_lengths.to(dtype)
        losses = losses + config.nll_weight * nll
    return DPOOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )


def pair_losses(
    config: LossConfig, chosen_logratios: Tensor, rejected_logratios: Tensor, reference_gap: Tensor
) -> Tensor:
    """Per-pair losses from the (possibly length-normalised) log-ratios rho_c, rho_r: [B] -> [B].

    `reference_gap` is ref_chosen - ref_rejected (zeros when reference-free); only `aot` reads it.
    """
    beta, e, kind = config.beta, config.label_smoothing, config.loss_type
    rc, rr = chosen_logratios, rejected_logratios
    delta = rc - rr

    if kind in ("sigmoid", "sigmoid_norm"):
        # With e > 0 this is the conservative DPO (cDPO) of the DPO paper: labels flipped with prob. e.
        return -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    if kind == "exo_pair":
        z = beta * delta
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - e)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(e)
        )
    if kind == "nca_pair":
        zc, zr = beta * rc, beta * rr
        return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
    if kind == "bco_pair":
        # TRL 1.16's form: no running reward shift (earlier TRL versions subtracted a running mean).
        return -F.logsigmoid(beta * rc) - F.logsigmoid(-beta * rr)
    if kind == "sppo_hard":
        return (rc - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            # Optimal transport between the batch's policy gaps and reference gaps, matched by rank.
            policy_gap = delta + reference_gap
            matched = torch.sort(policy_gap, dim=0).values - torch.sort(reference_gap, dim=0).values
        else:
            # Unpaired: chosen and rejected log-ratios matched by rank across the batch.
            matched = torch.sort(rc, dim=0).values - torch.sort(rr, dim=0).values
        return -(1 - e) * F.logsigmoid(beta * matched) - e * F.logsigmoid(-beta * matched)
    if kind == "apo_zero":
        return (1 - torch.sigmoid(beta * rc)) + torch.sigmoid(beta * rr)
    if kind == "apo_down":
        return torch.sigmoid(beta * rc) + (1 - torch.sigmoid(beta * delta))
    if kind == "discopop":
        z = beta * delta
        modulation = torch.sigmoid(z / config.discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    if kind == "simpo":
        z = beta * delta - config.simpo_gamma
        return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    raise AssertionError(f"unhandled loss_type {kind!r}")  # LossConfig validated it
