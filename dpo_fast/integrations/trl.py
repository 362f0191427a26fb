"""Drop-in for TRL's `DPOTrainer` (trl >= 1.16): the same trainer, its loss computed by dpo_fast.

Either use the subclass::

    from dpo_fast.integrations.trl import DPOTrainer      # instead of `from trl import DPOTrainer`

or patch TRL in place, one line before building the trainer::

    import dpo_fast.integrations.trl as fast; fast.patch_trl()

The policy runs its backbone only; `dpo_fast.linear_sequence_logps` turns the last hidden states and
the lm_head into per-sequence log-probs without materialising the logits, scoring only completion
tokens, and `dpo_fast.dpo_loss` applies TRL's loss formulas. The loss and the `rewards/*` and `logps/*`
metrics are TRL's; the diagnostics that need the whole softmax of every token (`entropy`,
`logits/chosen|rejected`, `mean_token_accuracy`) are not logged.

Not supported (a clear error at construction): `f_divergence_type` other than reverse KL,
`use_weighting` (WPO), `ld_alpha` (LD-DPO), MoE router auxiliary losses, vision-language datasets.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import trl
    from trl.trainer import dpo_trainer as _trl_dpo
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("dpo_fast.integrations.trl needs TRL >= 1.16: pip install 'dpo-fast[trl]'") from exc

from ..functional import linear_sequence_logps
from ..losses import LossConfig, loss_from_logps
from .hidden import add_hidden_state_forward, last_hidden_state

# TRL 1.16 reads label_smoothing in these losses only (its `sigmoid` ignores it).
_TRL_SMOOTHED = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _base_causal_lm(model):
    return model.get_base_model() if _trl_dpo.is_peft_model(model) else model


def _check_supported(trainer) -> None:
    problems = []
    if trainer.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type={trainer.f_divergence_type!r}")
    if trainer.use_weighting:
        problems.append("use_weighting=True")
    if trainer.ld_alpha is not None:
        problems.append(f"ld_alpha={trainer.ld_alpha}")
    if trainer.aux_loss_enabled:
        problems.append("a MoE router auxiliary loss")
    if getattr(trainer, "_is_vision_dataset", False):
        problems.append("a vision dataset")
    if problems:
        raise NotImplementedError(
            f"dpo_fast's TRL drop-in does not support {', '.join(problems)}; use trl.DPOTrainer for these"
        )


def _sequence_logps(model, lm_head, model_kwargs, labels):
    # Under autocast the backbone's output may be bf16 while the head is float32: the head's dtype wins.
    hidden = last_hidden_state(model, model_kwargs).to(lm_head.weight.dtype)
    return linear_sequence_logps(hidden, lm_head.weight, labels, bias=lm_head.bias)


def compute_loss(trainer, model, inputs, return_outputs=False):
    """TRL's `_compute_loss` with dpo_fast's fused linear log-probs (see the module docstring)."""
    mode = "train" if trainer.model.training else "eval"
    completion_mask = inputs["completion_mask"]
    input_ids = inputs["input_ids"]
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    # Aligned labels: position t scores token t+1 when that token belongs to the completion.
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    lm_head = _base_causal_lm(trainer.accelerator.unwrap_model(model)).get_output_embeddings()

    logps, lengths = _sequence_logps(model, lm_head, model_kwargs, labels)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)

    if trainer.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        # accelerate wraps the reference's forward in autocast when mixed precision is on; our hidden-state
        # forward sits above that wrapper, so the same autocast is entered here.
        with torch.no_grad(), trainer.accelerator.autocast(), _trl_dpo.disable_gradient_checkpointing(
            trainer.model, trainer.args.gradient_checkpointing_kwargs
        ):
            if trainer.ref_model is None:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                adapter = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
                context = (_trl_dpo.use_adapter(unwrapped, adapter_name=adapter)
                           if _trl_dpo.is_peft_model(unwrapped) else contextlib.nullcontext())
                with context:
                    ref_logps, _ = _sequence_logps(trainer.model, lm_head, model_kwargs, labels)
            else:
                ref_head = _base_causal_lm(trainer.accelerator.unwrap_model(trainer.ref_model)).get_output_embeddings()
                ref_logps, _ = _sequence_logps(trainer.ref_model, ref_head, model_kwargs, labels)
        ref_chosen, ref_rejected = ref_logps.chunk(2)

    loss = 0.0
    for loss_type, weight in zip(trainer.loss_types, trainer.loss_weights):
        if loss_type == "sft":
            loss = loss + weight * (-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1))
            continue
        smoothing = trainer.label_smoothing if loss_type in _TRL_SMOOTHED else 0.0
        config = LossConfig(beta=trainer.beta, loss_type=loss_type, label_smoothing=smoothing)
        # TRL clamps the completion lengths of the length-normalised losses to at least 1.
        out = loss_from_logps(config, chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                              chosen_lengths=chosen_lengths.clamp(min=1),
                              rejected_lengths=rejected_lengths.clamp(min=1))
        loss = loss + weight * out.loss
    _log_metrics(trainer, mode, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
    if return_outputs:
        return loss, {"chosen_logps": chosen_logps.detach(), "rejected_logps": rejected_logps.detach()}
    return loss


def _log_metrics(trainer, mode, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected) -> None:
    acc = trainer.accelerator
    chosen_rewards = trainer.beta * (chosen_logps - ref_chosen).detach()
    rejected_rewards = trainer.beta * (rejected_logps - ref_rejected).detach()
    metrics = trainer._metrics[mode]
    if mode == "train":
        tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += tokens // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]
    metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
    metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
    metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
    metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
    metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())


def _prepare(trainer) -> None:
    _check_supported(trainer)
    add_hidden_state_forward(_base_causal_lm(trainer.model))
    if trainer.ref_model is not None:
        add_hidden_state_forward(_base_causal_lm(trainer.ref_model))


class DPOTrainer(trl.DPOTrainer):
    """`trl.DPOTrainer` whose loss is computed by dpo_fast (same arguments, same metrics names)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _prepare(self)

    def _compute_loss(self, model, inputs, return_outputs):
        return compute_loss(self, model, inputs, return_outputs)


def patch_trl() -> None:
    """Make every `trl.DPOTrainer` built from now on compute its loss with dpo_fast."""
    cls = trl.DPOTrainer
    if getattr(cls, "_dpo_fast_patched", False):
        return
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        _prepare(self)

    cls.__init__ = __init__
    cls._compute_loss = lambda self, model, inputs, return_outputs: compute_loss(self, model, inputs, return_outputs)
    cls._dpo_fast_patched = True
