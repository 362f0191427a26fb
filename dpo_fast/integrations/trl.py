"""Drop-in for TRL's `DPOTrainer` (trl >= 1.16): the same trainer, its loss computed by dpo_fast.

Either use the subclass::

    from dpo_fast.integrations.trl import DPOTrainer      # instead of `from trl import DPOTrainer`

or patch TRL in place, one line before building the trainer::

    import dpo_fast.integrations.trl as fast; fast.patch_trl()

The policy runs its backbone only; `dpo_fast.linear_dpo_loss` turns the last hidden states, the lm_head
and the reference log-probs into TRL's loss without materialising the logits, scoring only completion
tokens, on the schedule every dpo_fast caller gets (one pass, 6·N·H·V flops, for the pair-separable
losses). Mixed loss types and `sft` take per-sequence log-probs (`dpo_fast.linear_sequence_logps`) and
TRL's formulas instead. The reference forward runs without gradient through the forward-only path. The
loss and the `rewards/*` and `logps/*` metrics are TRL's; the diagnostics that need the whole softmax of
every token (`entropy`, `logits/chosen|rejected`, `mean_token_accuracy`) are not logged.

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

from ..loss.formulas import LossConfig, loss_from_logps
from ..loss.functional import linear_dpo_loss, linear_sequence_logps
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


def _hidden_states(model, lm_head, model_kwargs):
    # Under autocast the backbone's output may be bf16 while the head is float32: the head's dtype wins.
    return last_hidden_state(model, model_kwargs).to(lm_head.weight.dtype)


def _sequence_logps(model, lm_head, model_kwargs, labels):
    return linear_sequence_logps(_hidden_states(model, lm_head, model_kwargs), lm_head.weight, labels,
                                 bias=lm_head.bias)


def _reference_logps(trainer, inputs, model_kwargs, labels, lm_head):
    """TRL's reference log-probs: precomputed, else the reference model's (or the policy's with its adapter
    disabled) under no_grad, through the forward-only path of `linear_sequence_logps`."""
    if trainer.precompute_ref_logps:
        return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
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
    return ref_logps.chunk(2)


def _loss_config(trainer, loss_type: str) -> LossConfig:
    smoothing = trainer.label_smoothing if loss_type in _TRL_SMOOTHED else 0.0
    return LossConfig(beta=trainer.beta, loss_type=loss_type, label_smoothing=smoothing,
                      discopop_tau=trainer.args.discopop_tau)


def _single_loss_config(trainer, labels) -> LossConfig | None:
    """The LossConfig when `linear_dpo_loss` computes TRL's whole loss in one call, else None.

    None keeps the per-sequence path (`linear_sequence_logps`, then TRL's formulas), whose backward
    recomputes the logits (8·N·H·V flops instead of the one-pass 6·N·H·V), for what one call cannot express:
    - several loss types (MPO-style `loss_type=[...]`): one call per type would repeat the vocabulary
      products; the log-probs are computed once instead and every formula applied to them;
    - `sft` alone or in a mix: TRL averages the chosen NLL over all the batch's chosen tokens, where
      `nll_weight` averages it per sequence;
    - a length-normalised loss (ipo, sigmoid_norm) with a completion of no scored token (truncated away):
      TRL divides by max(length, 1), `linear_dpo_loss` refuses such a row.
    """
    if len(trainer.loss_types) != 1 or trainer.loss_types[0] == "sft":
        return None
    config = _loss_config(trainer, trainer.loss_types[0])
    if config.needs_lengths and not bool(((labels != -100).sum(dim=1) > 0).all()):  # one host sync
        return None
    return config


def compute_loss(trainer, model, inputs, return_outputs=False):
    """TRL's `_compute_loss` with dpo_fast's fused linear loss (see the module docstring)."""
    mode = "train" if trainer.model.training else "eval"
    completion_mask = inputs["completion_mask"]
    input_ids = inputs["input_ids"]
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    # Aligned labels: position t scores token t+1 when that token belongs to the completion.
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    lm_head = _base_causal_lm(trainer.accelerator.unwrap_model(model)).get_output_embeddings()

    # The policy's backbone runs before the reference's, as in TRL (same dropout random stream).
    hidden = _hidden_states(model, lm_head, model_kwargs)
    ref_chosen, ref_rejected = _reference_logps(trainer, inputs, model_kwargs, labels, lm_head)
    config = _single_loss_config(trainer, labels)
    if config is not None:
        # The schedule every dpo_fast caller gets (`ops.schedule`): one pass for pair-separable losses. Its
        # log-probs come back detached there; the metrics below need none of their graph.
        out = linear_dpo_loss(hidden, lm_head.weight, labels, ref_chosen, ref_rejected, bias=lm_head.bias,
                              beta=config.beta, loss_type=config.loss_type,
                              label_smoothing=config.label_smoothing, discopop_tau=config.discopop_tau)
        loss = out.loss * trainer.loss_weights[0]
        chosen_logps, rejected_logps = out.chosen_logps, out.rejected_logps
    else:
        logps, lengths = linear_sequence_logps(hidden, lm_head.weight, labels, bias=lm_head.bias)
        chosen_logps, rejected_logps = logps.chunk(2)
        loss = _combined_loss(trainer, chosen_logps, rejected_logps, ref_chosen, ref_rejected, lengths)
    _log_metrics(trainer, mode, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
    if return_outputs:
        return loss, {"chosen_logps": chosen_logps.detach(), "rejected_logps": rejected_logps.detach()}
    return loss


def _combined_loss(trainer, chosen_logps, rejected_logps, ref_chosen, ref_rejected, lengths):
    """TRL's weighted sum over `loss_types` from per-sequence log-probs."""
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    loss = 0.0
    for loss_type, weight in zip(trainer.loss_types, trainer.loss_weights):
        if loss_type == "sft":
            loss = loss + weight * (-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1))
            continue
        # TRL clamps the completion lengths of the length-normalised losses to at least 1.
        out = loss_from_logps(_loss_config(trainer, loss_type), chosen_logps, rejected_logps, ref_chosen,
                              ref_rejected, chosen_lengths=chosen_lengths.clamp(min=1),
                              rejected_lengths=rejected_lengths.clamp(min=1))
        loss = loss + weight * out.loss
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
