"""`DPOLoss`: the loss keywords bound once, for use as a module in a model or trainer."""

from __future__ import annotations

from torch import Tensor, nn

from .formulas import DPOOutput, LossConfig
from .functional import fused_dpo_loss, linear_dpo_loss


class DPOLoss(nn.Module):
    """DPO loss module.

    `forward(hidden, weight, labels, ...)` runs `linear_dpo_loss` (fused lm_head, the lean path);
    `from_logits(logits, labels, ...)` runs `fused_dpo_loss`. Keyword arguments of either
    (ref log-probs, `ref_hidden`, `segment_ids`, `bias`, ...) pass through.
    """

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 nll_weight: float = 0.0, simpo_gamma: float = 0.0, discopop_tau: float = 0.05,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        # Validate at construction: a bad combination should fail before the first batch.
        self.config = LossConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                 nll_weight=nll_weight, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)
        self.ignore_index = ignore_index
        self.backend = backend

    def _kwargs(self) -> dict:
        c = self.config
        return dict(beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing, nll_weight=c.nll_weight,
                    simpo_gamma=c.simpo_gamma, discopop_tau=c.discopop_tau, ignore_index=self.ignore_index,
                    backend=self.backend)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, ref_chosen_logps: Tensor | None = None,
                ref_rejected_logps: Tensor | None = None, **kwargs) -> DPOOutput:
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps,
                               **{**self._kwargs(), **kwargs})

    def from_logits(self, logits: Tensor, labels: Tensor, ref_chosen_logps: Tensor | None = None,
                    ref_rejected_logps: Tensor | None = None, **kwargs) -> DPOOutput:
        return fused_dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, **{**self._kwargs(), **kwargs})

    def extra_repr(self) -> str:
        c = self.config
        return f"loss_type={c.loss_type!r}, beta={c.beta}, backend={self.backend!r}"
