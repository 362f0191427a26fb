"""DPO loss for a training loop written on transformers' `Trainer`.

One line on an existing trainer::

    trainer.compute_loss = DPOComputeLoss(ref_model=ref_model, beta=0.1)

Batches hold `input_ids` [2B, L] (rows [:B] chosen, [B:] rejected; prompt + completion per row),
`attention_mask`, and which tokens are scored, as either `completion_mask` [2B, L] (1 on completion
tokens, TRL's collator) or `labels` [2B, L] in the causal-LM convention (the token itself, -100 where
not scored; the shift happens here). Optional `ref_chosen_logps` / `ref_rejected_logps` [B] replace
the reference forward (precomputed reference log-probs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..loss.formulas import DPOOutput, LossConfig
from ..loss.functional import linear_dpo_loss, linear_sequence_logps
from .hidden import add_hidden_state_forward, last_hidden_state

_BATCH_KEYS = {"completion_mask", "labels", "ref_chosen_logps", "ref_rejected_logps"}


def aligned_labels(inputs: dict) -> Tensor:
    """Labels aligned with the outputs: position t scores token t+1, -100 where not scored."""
    input_ids = inputs["input_ids"]
    if "completion_mask" in inputs:
        target = input_ids.masked_fill(inputs["completion_mask"] == 0, -100)
    elif "labels" in inputs:
        target = inputs["labels"]
        if target.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(target.shape)}")
    else:
        raise ValueError("the batch needs `completion_mask` or `labels` to know which tokens are scored")
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = target[:, 1:]
    return labels


def _unwrap(model):
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _hidden_and_head(model, inputs: dict):
    add_hidden_state_forward(_unwrap(model))
    head = _unwrap(model).get_output_embeddings()
    model_kwargs = {k: v for k, v in inputs.items() if k not in _BATCH_KEYS}
    # Under autocast the backbone's output may be bf16 while the head is float32: the head's dtype wins.
    return last_hidden_state(model, model_kwargs).to(head.weight.dtype), head


def compute_dpo_loss(model, inputs: dict, *, ref_model=None, beta: float = 0.1, loss_type: str = "sigmoid",
                     label_smoothing: float = 0.0, nll_weight: float = 0.0, simpo_gamma: float = 0.0,
                     discopop_tau: float = 0.05, backend: str = "auto") -> DPOOutput:
    """DPOOutput for one batch (see the module docstring for the batch's keys).

    Reference log-probs come from `inputs["ref_*_logps"]`, else from `ref_model` under no_grad (the
    forward-only path), else the loss is reference-free. The loss is `linear_dpo_loss`'s, on its default
    schedule (one pass for pair-separable losses, where `chosen_logps`/`rejected_logps` come back detached).
    """
    rows = inputs["input_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"input_ids must hold 2B rows (B chosen then B rejected), got {rows}")
    labels = aligned_labels(inputs)
    # The policy's backbone runs before the reference's (the order of the dropout random stream).
    hidden, head = _hidden_and_head(model, inputs)
    ref_chosen, ref_rejected = inputs.get("ref_chosen_logps"), inputs.get("ref_rejected_logps")
    if ref_chosen is None and ref_model is not None:
        with torch.no_grad():
            ref_hidden, ref_head = _hidden_and_head(ref_model, inputs)
            ref_logps, _ = linear_sequence_logps(ref_hidden, ref_head.weight, labels, bias=ref_head.bias,
                                                 backend=backend)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
    return linear_dpo_loss(hidden, head.weight, labels, ref_chosen, ref_rejected, bias=head.bias, beta=beta,
                           loss_type=loss_type, label_smoothing=label_smoothing, nll_weight=nll_weight,
                           simpo_gamma=simpo_gamma, discopop_tau=discopop_tau, backend=backend)


class DPOComputeLoss:
    """A `Trainer.compute_loss` replacement: `trainer.compute_loss = DPOComputeLoss(ref_model=..., beta=...)`.

    The latest batch's `DPOOutput` is kept in `last_output` for logging rewards.
    """

    def __init__(self, *, ref_model=None, **loss_kwargs):
        LossConfig(**{k: v for k, v in loss_kwargs.items() if k != "backend"})  # fail at construction, not step 1
        self.ref_model = ref_model
        self.loss_kwargs = loss_kwargs
        self.last_output: DPOOutput | None = None

    def __call__(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        out = compute_dpo_loss(model, inputs, ref_model=self.ref_model, **self.loss_kwargs)
        self.last_output = out
        return (out.loss, {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}) \
            if return_outputs else out.loss
