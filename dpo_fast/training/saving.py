"""What a `DPOTrainer` checkpoint holds and how a run starts: a fresh run (the old run's metrics and
checkpoints cleared) or a resume (the checkpoint checked against this run's settings, the abandoned
checkpoints of a rollback archived, then the weights, optimizer, scheduler and RNG states loaded). The
checkpoint files themselves (manifests, atomic writes, validation, lineage) are `checkpoint`'s.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import DPOConfig
from .metrics import METRICS_FILE, TrainingDiverged, truncate_metrics


def start_run(config: DPOConfig, run_settings: dict[str, Any], *, rank: int,
              barrier: Callable[[], None]) -> tuple[dict[str, Any], str | None, dict[str, Any] | None]:
    """(this run's lineage record, the checkpoint to resume or None, its trainer state or None), every rank.

    A resume is checked on every rank before any of them moves a file (a refused resume changes nothing);
    its accepted differences (a changed learning rate, ...) are warnings. A fresh run removes the previous
    run's metrics and checkpoints (overwrite_output_dir), so that a later resume_from_checkpoint='latest'
    cannot pick up a checkpoint of the other run.
    """
    out = config.output_dir
    if config.resume_from_checkpoint:
        path = ckpt.resolve_resume_path(config.resume_from_checkpoint, out)
        state = ckpt.read_trainer_state(path)
        for note in ckpt.check_resume(path, state, run_settings):
            warnings.warn(note, stacklevel=4)  # the caller of the trainer method that prepared the run
        barrier()
        # This run continues `path`: it is the newest lineage, and a rollback moves the later
        # checkpoints of the abandoned run aside (`latest` then follows this run).
        lineage = ckpt.start_lineage(out, resumed_from=path)
        barrier()
        if rank == 0:
            ckpt.archive_abandoned(out, path)
        return lineage, path, state
    if rank == 0:
        metrics_path = os.path.join(out, METRICS_FILE)
        if os.path.exists(metrics_path):
            os.unlink(metrics_path)
        for _, stale in ckpt.list_checkpoints(out):
            shutil.rmtree(stale)
    barrier()
    return ckpt.start_lineage(out), None, None


def load_training_state(path: str, *, model: nn.Module, outputs: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, adapter: bool, fsdp: bool, rank: int, device: torch.device) -> None:
    """Load a checkpoint's weights (the adapter's under LoRA; through the FSDP-wrapped `outputs` under FSDP),
    optimizer (this rank's shard under FSDP), scheduler and RNG states."""
    if adapter:
        import peft

        peft.set_peft_model_state_dict(model, ckpt.load_safetensors_dir(path))
    elif fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {f"model.{k}": v for k, v in ckpt.load_safetensors_dir(path).items()}
        set_model_state_dict(outputs, full, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        ckpt.load_model_weights(model, path)
    optim_file = os.path.join(path, f"optimizer_rank{rank}.pt" if fsdp else "optimizer.pt")
    # weights_only=True: tensors, numbers and containers only, so a checkpoint from elsewhere cannot run code.
    optimizer.load_state_dict(ckpt.load_state(optim_file, map_location=device))
    scheduler.load_state_dict(ckpt.load_state(os.path.join(path, "scheduler.pt")))
    ckpt.load_rng_state(path, rank)


def announce_resume(config: DPOConfig, path: str, state: dict[str, Any], global_step: int) -> None:
    """Rank 0: metrics.jsonl cut back to the checkpoint's step, and 'resumed from checkpoint-N ...'."""
    truncate_metrics(os.path.join(config.output_dir, METRICS_FILE), global_step)
    print(ckpt.resume_message(path, state), file=sys.stderr)


def full_state_dict(outputs: nn.Module) -> dict[str, Tensor]:
    """Under FSDP: the full model state on the CPU, gathered from every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(outputs, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_model(model: nn.Module, directory: str, state_dict: dict[str, Tensor] | None = None) -> None:
    if state_dict is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, state_dict=state_dict)


def check_weights_finite(model: nn.Module, step: int, *, distributed: bool, device: torch.device) -> None:
    """TrainingDiverged unless every trainable weight is finite on every rank: a checkpoint never holds NaN or
    inf weights (non-finite steps are skipped, but an enormous learning rate can overflow a weight in a
    finite step)."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
    if hasattr(finite, "full_tensor"):  # FSDP2: each rank checks its shards
        finite = finite.full_tensor()
    if distributed:
        finite = finite.to(device, torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise TrainingDiverged(f"stopped at step {step}: the weights hold NaN or infinite values; "
                               "no checkpoint was written for this step; lower the learning rate")
