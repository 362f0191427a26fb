"""`DPOConfig`: every knob of the trainer, validated once, loadable from YAML.

Field names follow `transformers.TrainingArguments` where the two overlap, and TRL's `DPOConfig` for
the DPO-specific ones, so a config written for either reads the same here. Each field carries its
help text in `metadata["help"]`; the command line builds one flag per field from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..data.pairs import LAYOUTS
from ..loss.formulas import REFERENCE_FREE, LossConfig
from ..loss.validation import BACKENDS

LR_SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw_torch", "sgd")
TRUNCATIONS = ("keep_end", "keep_start")


def _f(default: Any, help: str, **kwargs) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


def field_type(name: str) -> str:
    """The declared type of a DPOConfig field as written in the class: 'int', 'float', 'bool', 'str', 'str | None'."""
    return _FIELD_TYPES[name]


def coerce_field(name: str, value: Any, *, source: str = "config") -> Any:
    """Bring a YAML or command-line value to the field's type (YAML reads `5e-7` as a string)."""
    kind = field_type(name)
    if value is None:
        if kind.endswith("| None"):
            return None
        raise ValueError(f"{source}: {name} cannot be null (expected {kind})")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str | None" and isinstance(value, bool):
            return value  # resume_from_checkpoint: true
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name} must be {kind}, got {value!r}") from None


@dataclass
class DPOConfig:
    """Training configuration. Invalid combinations raise ValueError naming the field."""

    output_dir: str = _f("dpo_output", "Where metrics, checkpoints and the final model are written.")
    overwrite_output_dir: bool = _f(False, "Allow writing into an output_dir that already holds another run.")
    # Optimisation.
    learning_rate: float = _f(5e-7, "Peak learning rate (after warmup).")
    per_device_train_batch_size: int = _f(4, "Preference pairs per micro-batch on each device.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step on each device.")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = derive from num_train_epochs.")
    num_train_epochs: float = _f(1.0, "Passes over the data when max_steps is -1.")
    warmup_ratio: float = _f(0.1, "Fraction of the steps spent warming the learning rate up linearly from 0.")
    lr_scheduler_type: str = _f("cosine", f"Decay after warmup: {', '.join(LR_SCHEDULERS)}.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this value; 0 = no clipping.")
    optim: str = _f("adamw_torch", f"Optimizer: {', '.join(OPTIMIZERS)}.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (AdamW) or L2 (SGD).")
    gradient_checkpointing: bool = _f(
        True, "Recompute each layer's activations in the backward (non-reentrant, as TRL's DPOConfig): memory for "
              "layer inputs only; the reference forward never recomputes. --no-gradient-checkpointing turns it off.")
    bf16: bool = _f(False, "bfloat16 autocast for the model on CUDA (ignored on the CPU).")
    max_nonfinite_steps: int = _f(
        3, "A step whose loss or gradient norm is NaN or infinite is skipped (no update); this many in a row stop "
           "the run with an error naming the step.")
    seed: int = _f(42, "Seed for the data order, dropout and initialisation of new weights.")
    # Logging and checkpoints.
    logging_steps: int = _f(10, "Log metrics every this many optimizer steps.")
    save_steps: int = _f(0, "Save a checkpoint every this many optimizer steps; 0 = by save_minutes only.")
    save_minutes: float = _f(
        30.0, "Also save a checkpoint when this many minutes have passed since the last one (so a crash or "
              "preemption loses at most that much), replacing the previous such save; 0 = off. SIGTERM/SIGINT "
              "always save before exiting.")
    save_total_limit: int = _f(0, "Keep at most this many checkpoints (oldest removed first); 0 = keep all.")
    resume_from_checkpoint: str | None = _f(
        None, "Resume from this checkpoint directory, or 'latest' for the newest one in output_dir.")
    merge_lora: bool = _f(False, "At the final export, merge LoRA adapters into the base weights.")
    report_to_tensorboard: bool = _f(True, "Also write TensorBoard event files when tensorboard is installed.")
    # DPO loss.
    beta: float = _f(0.1, "DPO temperature: scale of the implicit reward.")
    loss_type: str = _f("sigmoid", "DPO-family loss.")
    label_smoothing: float = _f(0.0, "Label-smoothing epsilon for the losses that read it (cDPO, robust, ...).")
    nll_weight: float = _f(0.0, "Weight of the RPO term (per-token NLL of the chosen response).")
    simpo_gamma: float = _f(0.0, "SimPO target reward margin.")
    discopop_tau: float = _f(0.05, "DiscoPOP temperature.")
    # Data.
    max_length: int = _f(1024, "Longest prompt + response in tokens; longer pairs are truncated.")
    truncation: str = _f("keep_end", f"Which end of an over-long prompt to keep: {', '.join(TRUNCATIONS)}.")
    layout: str = _f("prefix_shared", f"Batch layout: {', '.join(LAYOUTS)}.")
    max_tokens_per_row: int = _f(
        0, "Token capacity of one packed row (packed/prefix_shared layouts); 0 = one row per micro-batch under "
           "FlexAttention or flash varlen, twice max_length under a dense mask (eager/sdpa).")
    max_tokens_per_batch: int = _f(
        0, "Token-budget micro-batches: pack pairs into bins of this many tokens (dpo_fast.data.packing.pack, balanced "
           "across ranks) instead of per_device_train_batch_size pairs; 0 = off.")
    # Reference model.
    precompute_ref: bool = _f(False, "Compute the reference log-probs once, cache them on disk, free the reference.")
    ref_cache_dir: str | None = _f(None, "Directory of the reference log-prob cache; default output_dir/ref_cache.")
    # Adapters.
    lora_r: int = _f(0, "LoRA rank; 0 = full fine-tuning. Needs the extra dpo-fast[peft].")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: str = _f(
        "q_proj,k_proj,v_proj,o_proj", "Comma-separated module names that get LoRA adapters.")
    # Execution.
    backend: str = _f("auto", f"Kernels for the loss: {', '.join(BACKENDS)} ('auto' = triton on CUDA).")
    fsdp: bool = _f(False, "Shard parameters, gradients and optimizer state with FSDP2 (fully_shard).")
    ddp_timeout: int = _f(
        1800, "Seconds a collective waits for the other processes (torch.distributed) before the run fails with "
              "an error naming the rank.")
    flex_attention: bool = _f(
        True, "On CUDA, run the packed and prefix_shared layouts with attn_implementation='flex_attention' when the "
              "model's class supports it (a block-sparse mask, no [L, L] tensor); False keeps the model's own.")

    def __post_init__(self) -> None:
        _ = self.loss_config  # validates the loss fields with the library's own checks
        positive_ints = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                         "max_nonfinite_steps", "ddp_timeout")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("save_steps", "save_total_limit", "lora_r", "max_tokens_per_row", "max_tokens_per_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (one prompt and one completion token), "
                             f"got {self.max_length!r}")
        if not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            raise ValueError(f"max_steps must be -1 (use num_train_epochs) or an integer >= 1, got {self.max_steps!r}")
        if self.max_steps == -1 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}")
        if not (0.0 <= self.warmup_ratio <= 1.0):
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if not (math.isfinite(self.save_minutes) and self.save_minutes >= 0):
            raise ValueError(f"save_minutes must be a finite number >= 0 (0 = off), got {self.save_minutes!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        choices = {
            "lr_scheduler_type": LR_SCHEDULERS, "optim": OPTIMIZERS, "truncation": TRUNCATIONS,
            "layout": LAYOUTS, "backend": BACKENDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not known; expected one of {', '.join(allowed)}")
        if not self.output_dir:
            raise ValueError("output_dir must be a non-empty path")
        if self.max_tokens_per_row and self.max_tokens_per_row < self.max_length:
            raise ValueError(
                f"max_tokens_per_row={self.max_tokens_per_row} is smaller than max_length={self.max_length}: "
                "the longest pair would not fit in a row")
        if self.merge_lora and not self.lora_r:
            raise ValueError("merge_lora=True needs LoRA adapters (lora_r > 0)")
        if self.resume_from_checkpoint is True:  # YAML `resume_from_checkpoint: true`
            self.resume_from_checkpoint = "latest"
        elif self.resume_from_checkpoint is False:
            self.resume_from_checkpoint = None

    @property
    def loss_config(self) -> LossConfig:
        return LossConfig(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                          nll_weight=self.nll_weight, simpo_gamma=self.simpo_gamma, discopop_tau=self.discopop_tau)

    @property
    def reference_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE

    def row_capacity(self, dense_mask: bool) -> int | None:
        """Tokens per packed row: max_tokens_per_row, else 2 * max_length under a dense mask (its cost grows
        with R * L^2), else None (one row per micro-batch: FlexAttention skips masked blocks, varlen flattens)."""
        return self.max_tokens_per_row or (2 * self.max_length if dense_mask else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> DPOConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown DPOConfig field(s) {', '.join(unknown)}")
        return cls(**{name: coerce_field(name, value, source=source) for name, value in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> DPOConfig:
        """Read a YAML mapping of field names to values; keyword overrides win over the file."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid YAML: {e}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {os.fspath(path)!r} must hold a mapping of field: value, "
                             f"got {type(values).__name__}")
        return cls.from_dict({**values, **overrides}, source=f"config file {os.fspath(path)!r}")


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(DPOConfig)}
