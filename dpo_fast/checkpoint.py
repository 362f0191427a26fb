"""Crash-safe checkpoints: `output_dir/checkpoint-<step>/`, written whole or not at all.

A checkpoint is assembled in a hidden temporary directory next to its final place; every file is
fsynced, then the directory is renamed into place and the parent directory fsynced. A crash during
the save leaves only a stray temporary directory (ignored, and removed by the next save), never a
half-written `checkpoint-<step>`: the newest complete checkpoint stays the one resume picks.

Contents:
    model.safetensors (+ config.json)   `save_pretrained` of the policy (LoRA: the adapter only)
    optimizer.pt, scheduler.pt          state dicts (FSDP: one optimizer shard per rank)
    rng_state_<rank>.pt                 python, numpy, torch (and CUDA) generator states of each rank
    trainer_state.json                  step, data position, config; written last, marks completeness
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under `root` (directories too: their entries are what rename reads)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


# mkstemp creates files readable by their owner only; published files get the usual rw-r--r--.
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path`; on success it is fsynced, made 0644 and renamed onto `path`.

    A failure (or a crash) leaves `path` as it was: the temporary file is removed or stays hidden.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and os.replace."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume_path(resume_from_checkpoint: str, output_dir: str) -> str:
    """'latest' -> newest checkpoint of output_dir; a path -> that checkpoint, checked complete."""
    if resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint='latest' but {output_dir!r} holds no complete checkpoint-<step> directory")
        return path
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise FileNotFoundError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is not a complete checkpoint (no {STATE_FILE})")
    return resume_from_checkpoint


def save_checkpoint(
    output_dir: str,
    step: int,
    *,
    save_model: Callable[[str], None],
    optimizer_state: dict | None,
    scheduler_state: dict,
    trainer_state: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    sharded_optimizer_state: dict | None = None,
    save_total_limit: int = 0,
) -> str:
    """Write `output_dir/checkpoint-<step>` atomically; every rank calls it (rank 0 does the renaming).

    save_model(directory) writes the model files (rank 0 only). optimizer_state is saved by rank 0;
    sharded_optimizer_state (FSDP) by every rank under its rank number.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")
    if rank == 0:
        for stale in glob.glob(os.path.join(output_dir, f"{_TMP_PREFIX}*")):
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    if sharded_optimizer_state is not None:
        torch.save(sharded_optimizer_state, os.path.join(tmp, f"optimizer_rank{rank}.pt"))
    barrier()
    if rank == 0:
        save_model(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
        state = {**trainer_state, "global_step": step, "world_size": world_size}
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        fsync_tree(tmp)
        if os.path.exists(final):
            # Re-saving the same step (a resumed run): move the old one aside first, so that at every
            # moment one complete copy exists under a name resume would find or could be recovered from.
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_path(output_dir)
        if save_total_limit:
            for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_rng_state(checkpoint_dir: str, rank: int) -> None:
    path = os.path.join(checkpoint_dir, f"rng_state_{rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir!r} has no {os.path.basename(path)}: it was written by fewer ranks "
                                "than this run has; resume with the same number of processes")
    set_rng_state(torch.load(path, weights_only=False))


def load_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory!r} holds no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def load_model_weights(model: nn.Module, directory: str) -> None:
    """Load a `save_pretrained` directory of a plain (non-adapter) model into `model` in place.

    Keys missing from the files must be tied to a loaded parameter (save_pretrained drops tied copies).
    """
    state = load_safetensors_dir(directory)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{directory!r} holds weights this model does not have: {', '.join(unexpected[:5])}")
    loaded_ptrs = {own[k].data_ptr() for k in state}
    untied_missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs]
    if untied_missing:
        raise ValueError(f"{directory!r} lacks weights of this model: {', '.join(untied_missing[:5])}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
