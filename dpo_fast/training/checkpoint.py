"""Crash-safe checkpoints: `output_dir/checkpoint-<step>/`, written whole or not at all.

A checkpoint is assembled in a hidden temporary directory next to its final place; every file is
fsynced, then the directory is renamed into place and the parent directory fsynced. A crash during
the save leaves only a stray temporary directory (ignored, and removed by the next save), never a
half-written `checkpoint-<step>`: the newest complete checkpoint stays the one resume picks.

Contents:
    model.safetensors (+ config.json)   `save_pretrained` of the policy (LoRA: the adapter only)
    tokenizer files (+ chat template)   `save_pretrained` of the tokenizer, when one is given
    optimizer.pt, scheduler.pt          state dicts (FSDP: one optimizer shard per rank)
    rng_state_<rank>.pt                 python, numpy, torch (and CUDA) generator states of each rank
    trainer_state.json                  step, data position, config, run settings, lineage
    manifest.json                       size and CRC-32 of every other file; written last

Before a checkpoint is used it is validated against its manifest (`validate_checkpoint`): every file
present with its recorded size and checksum. `latest` skips an invalid checkpoint with a warning naming
what is wrong and takes the previous valid one; a checkpoint named explicitly must be valid.

Lineage: every run (a fresh start or a resume) gets a run index one above the highest recorded in
output_dir, and its checkpoints record it with the checkpoint they continue (`start_lineage`). `latest`
is the newest checkpoint of the newest run, so after a rollback (resuming from an older checkpoint) it
never returns to the abandoned run's newer checkpoints; `archive_abandoned` moves those aside.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
ABANDONED_DIR = "abandoned"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
# Files are checksummed in blocks of this size (CRC-32 runs at ~6.4 GB/s on one CPU core against
# ~1.8 GB/s for SHA-256, measured on 256 MiB; it detects truncation and garbage, not tampering).
_CHECKSUM_BLOCK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: invalid, or from a run that differs from this one."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No usable checkpoint where one was asked for."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous checkpoints are kept)."""


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
    """Every generator's state as tensors and plain numbers, so that it loads with torch.load(weights_only=True)
    (a pickled numpy array would need weights_only=False, which lets a checkpoint from elsewhere run code)."""
    version, python_keys, gauss = random.getstate()
    name, numpy_keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "keys": torch.tensor(python_keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(numpy_keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["position"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first (by step; see `latest_checkpoint`)."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _run_index(checkpoint_dir: str) -> int:
    """The lineage run index a checkpoint records; -1 when unreadable or written before lineages existed."""
    try:
        index = read_trainer_state(checkpoint_dir).get("lineage", {}).get("run_index", -1)
    except (OSError, ValueError, AttributeError):
        return -1
    return index if isinstance(index, int) else -1


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """Complete checkpoints, the newest run's newest step first: the order `latest` tries them in."""
    found = [(_run_index(path), step, path) for step, path in list_checkpoints(output_dir)]
    return [path for _, _, path in sorted(found, reverse=True)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of the newest run (not validated: see `resolve_resume_path`)."""
    found = checkpoints_newest_first(output_dir)
    return found[0] if found else None


def file_checksum(path: str) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits, read in blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHECKSUM_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def write_manifest(checkpoint_dir: str) -> dict[str, Any]:
    """Record the size and checksum of every file under `checkpoint_dir` in its manifest (written atomically)."""
    files = {}
    for dirpath, _, filenames in os.walk(checkpoint_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, checkpoint_dir).replace(os.sep, "/")
            if rel == MANIFEST_FILE or name.startswith(".tmp-"):
                continue
            files[rel] = {"size": os.path.getsize(path), "crc32": file_checksum(path)}
    manifest = {"version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
    atomic_write_bytes(os.path.join(checkpoint_dir, MANIFEST_FILE),
                       (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _required_files(checkpoint_dir: str, state: Mapping[str, Any]) -> list[str]:
    """What a checkpoint without a manifest (written by an older version) must hold to be resumed."""
    names = [STATE_FILE, "scheduler.pt"]
    world_size = state.get("world_size", 1)
    names += [f"rng_state_{r}.pt" for r in range(world_size if isinstance(world_size, int) else 1)]
    if not os.path.isfile(os.path.join(checkpoint_dir, "optimizer_rank0.pt")):
        names.append("optimizer.pt")
    return names


def validate_checkpoint(checkpoint_dir: str, *, checksums: bool = True) -> list[str]:
    """What is wrong with a checkpoint directory, one short phrase per problem; [] when it is usable.

    Checks: the trainer state is a JSON object with a step; with a manifest, every file it lists is
    present with its recorded size (and, with checksums=True, its CRC-32); without one (an older
    version's checkpoint), the files resume needs are present. Model weights are covered by the manifest.
    """
    problems = []
    if not os.path.isdir(checkpoint_dir):
        return ["not a directory"]
    try:
        state = read_trainer_state(checkpoint_dir)
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            problems.append(f"{STATE_FILE} holds no step count")
            state = state if isinstance(state, dict) else {}
    except FileNotFoundError:
        return [f"no {STATE_FILE} (an incomplete save)"]
    except (OSError, ValueError) as e:
        problems.append(f"{STATE_FILE} is not valid JSON ({e})")
        state = {}
    manifest_path = os.path.join(checkpoint_dir, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        missing = [n for n in _required_files(checkpoint_dir, state)
                   if not os.path.isfile(os.path.join(checkpoint_dir, n))]
        if not glob.glob(os.path.join(checkpoint_dir, "*.safetensors")):
            missing.append("model weights (*.safetensors)")
        return problems + [f"{name} is missing" for name in missing]
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise ValueError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return problems + [f"{MANIFEST_FILE} is unreadable ({e})"]
    for rel, expected in files.items():
        path = os.path.join(checkpoint_dir, *rel.split("/"))
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
            continue
        size = os.path.getsize(path)
        if size != expected.get("size"):
            problems.append(f"{rel} has {size} bytes, {expected.get('size')} when saved (truncated or overwritten)")
        elif checksums and file_checksum(path) != expected.get("crc32"):
            problems.append(f"{rel} does not match its checksum (corrupted)")
    return problems


def resolve_resume_path(resume_from_checkpoint: str, output_dir: str, *, warn: Callable[[str], None] | None = None,
                        checksums: bool = True) -> str:
    """'latest' -> the newest valid checkpoint of output_dir's newest run; a path -> that checkpoint, valid.

    With 'latest', an invalid checkpoint is skipped with a warning (through `warn`, default
    `warnings.warn`) naming what is wrong, and the previous one is tried. Raises CheckpointNotFound when
    nothing usable is there, CheckpointError for an explicitly named invalid checkpoint.
    """
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    if resume_from_checkpoint == "latest":
        skipped = []
        for path in checkpoints_newest_first(output_dir):
            problems = validate_checkpoint(path, checksums=checksums)
            if not problems:
                return path
            skipped.append(os.path.basename(path))
            warn(f"{path} is not usable ({'; '.join(problems)}): skipped, trying the previous checkpoint")
        why = f" ({', '.join(skipped)} invalid)" if skipped else ""
        raise CheckpointNotFound(f"resume_from_checkpoint='latest' but {output_dir!r} holds no valid "
                                 f"checkpoint-<step> directory{why}: start without resuming")
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise CheckpointNotFound(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is not a complete checkpoint (no {STATE_FILE})")
    problems = validate_checkpoint(resume_from_checkpoint, checksums=checksums)
    if problems:
        raise CheckpointError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not usable: "
                              f"{'; '.join(problems)}")
    return resume_from_checkpoint


def check_writable_dir(path: str) -> None:
    """Create `path` if needed and write (then remove) a probe file there; CheckpointWriteError naming the
    path and the OS error otherwise. Called before any model is loaded, so that a read-only or misplaced
    output_dir fails in a second, not after the first step."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"output_dir {path!r} is not writable: {e.strerror or e}") from None


def _write_failure(what: str, directory: str, error: BaseException, consequence: str) -> CheckpointWriteError:
    """One line naming what could not be written, where, and the OS error."""
    code = getattr(error, "errno", None)
    if code is None:
        # torch.save reports a full disk as a RuntimeError ("... iostream error"): look at the disk.
        with contextlib.suppress(OSError):
            if shutil.disk_usage(directory).free < (1 << 20):
                code = errno.ENOSPC
    reason = os.strerror(code).lower() if code else str(error)
    return CheckpointWriteError(code or errno.EIO, f"could not write {what}: {reason}; {consequence}")


@contextlib.contextmanager
def _cleanup_on_failure(tmp: str, output_dir: str, step: int):
    """A failed write removes the temporary directory (it may hold gigabytes) and says why in one line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(f"checkpoint-{step} in {output_dir!r}", output_dir, e,
                             "the previous checkpoints are kept") from e


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
    failed_anywhere: Callable[[bool], bool] | None = None,
    sharded_optimizer_state: dict | None = None,
    save_total_limit: int = 0,
    tokenizer: Any = None,
) -> str:
    """Write `output_dir/checkpoint-<step>` atomically; every rank calls it (rank 0 does the renaming).

    save_model(directory) writes the model files (rank 0 only). optimizer_state is saved by rank 0;
    sharded_optimizer_state (FSDP) by every rank under its rank number. tokenizer: saved with the model
    (`save_tokenizer`), so that the checkpoint loads as a model directory. The manifest is written last.
    A write that fails (full disk, read-only directory) removes the temporary directory and raises
    CheckpointWriteError naming the path and the OS error, on every rank: after each phase the ranks agree
    through `failed_anywhere(failed) -> bool` (a collective that is True when any rank passed True; by default
    `barrier()` and the rank's own flag), so a rank whose disk is full does not leave the others waiting at
    the next barrier until the process group's timeout.
    """
    agree = failed_anywhere or (lambda failed: barrier() or failed)

    def phase(write: Callable[[], None]) -> None:
        error = None
        try:
            with _cleanup_on_failure(tmp, output_dir, step):
                write()
        except CheckpointWriteError as e:
            error = e
        if agree(error is not None):
            raise error or CheckpointWriteError(
                f"checkpoint-{step} in {output_dir!r} was not written: another process could not write its part "
                "(its error says why); the previous checkpoints are kept")

    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")

    def make_tmp() -> None:
        if rank == 0:
            for stale in glob.glob(os.path.join(output_dir, f"{_TMP_PREFIX}*")):
                shutil.rmtree(stale, ignore_errors=True)  # leftovers of a crashed save
            os.makedirs(tmp)

    def write_rank_files() -> None:
        torch.save(rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
        if sharded_optimizer_state is not None:
            torch.save(sharded_optimizer_state, os.path.join(tmp, f"optimizer_rank{rank}.pt"))

    def write_the_rest() -> None:
        if rank != 0:
            return
        save_model(tmp)
        save_tokenizer(tokenizer, tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
        state = {**trainer_state, "global_step": step, "world_size": world_size}
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        write_manifest(tmp)
        fsync_tree(tmp)
        _replace_directory(tmp, final)
        if save_total_limit:
            # The oldest go, in the order `latest` uses: an abandoned run's checkpoints before the current run's.
            for path in checkpoints_newest_first(output_dir)[save_total_limit:]:
                shutil.rmtree(path, ignore_errors=True)

    for write in (make_tmp, write_rank_files, write_the_rest):
        phase(write)
    return final


def write_directory(path: str, write: Callable[[str], None], *, tokenizer: Any = None) -> str:
    """Write a model directory (the final export) whole or not at all: `write(tmp)` fills a temporary
    directory beside `path` (plus the tokenizer, when given), which is fsynced and then replaces `path`. A
    failed write removes the temporary directory and raises CheckpointWriteError naming the path and the
    OS error; `path` keeps its previous contents until the replacement is complete."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = path.rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
        save_tokenizer(tokenizer, tmp)
        fsync_tree(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(repr(path), parent, e, "its previous contents are kept") from e
    _replace_directory(tmp, path)
    return path


def _replace_directory(tmp: str, final: str) -> None:
    """Rename the complete directory `tmp` to `final`. An existing `final` (a step saved again by a resumed
    run, a new final export) is moved aside first, so that at every moment one complete copy exists under a
    name resume would find or that can be recovered from."""
    final = final.rstrip(os.sep)
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_path(os.path.dirname(os.path.abspath(final)))


def save_tokenizer(tokenizer: Any, directory: str) -> None:
    """`tokenizer.save_pretrained(directory)` (vocabulary, special tokens and chat template), so that a
    checkpoint or final model loads with `AutoTokenizer.from_pretrained`; nothing for None."""
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)


def read_trainer_state(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def resume_message(checkpoint_dir: str, state: Mapping[str, Any]) -> str:
    """The line a resume prints: `resumed from checkpoint-N (step N, epoch E)`."""
    return (f"resumed from {os.path.basename(os.path.normpath(checkpoint_dir))} "
            f"(step {state.get('global_step')}, epoch {state.get('epoch')})")


# ------------------------------------------------------------------------------------------------
# Lineage: which run a checkpoint belongs to and which checkpoint that run continued


def start_lineage(output_dir: str, resumed_from: str | None = None) -> dict[str, Any]:
    """The lineage record of a run starting now, to store in every checkpoint it writes (trainer_state["lineage"]).

    run_index: one above every run index recorded in output_dir (0 for the first run), so that `latest`
    prefers this run's checkpoints to any older run's, whatever their steps. resumed_from: the checkpoint
    this run continues (its name, step and run), None for a fresh start.
    """
    indices = [_run_index(path) for _, path in list_checkpoints(output_dir)]
    lineage: dict[str, Any] = {"run_id": uuid.uuid4().hex, "run_index": max(indices, default=-1) + 1,
                               "resumed_from": None}
    if resumed_from is not None:
        state = read_trainer_state(resumed_from)
        lineage["resumed_from"] = {"checkpoint": os.path.basename(os.path.normpath(resumed_from)),
                                   "step": state.get("global_step"),
                                   "run_id": state.get("lineage", {}).get("run_id")}
    return lineage


def archive_abandoned(output_dir: str, resumed_from: str) -> list[str]:
    """After a rollback (resuming from a checkpoint that is not the newest), move the checkpoints of steps
    after it into output_dir/abandoned/<name>-<run>/, where `latest` never looks; returns their new paths."""
    step = read_trainer_state(resumed_from).get("global_step", 0)
    moved = []
    for later_step, path in list_checkpoints(output_dir):
        if later_step <= step or os.path.samefile(path, resumed_from):
            continue
        run = read_trainer_state(path).get("lineage", {}).get("run_id") or "unknown"
        target = os.path.join(output_dir, ABANDONED_DIR, f"{os.path.basename(path)}-{str(run)[:8]}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(path, target)
        moved.append(target)
    if moved:
        _fsync_path(output_dir)
    return moved


# ------------------------------------------------------------------------------------------------
# Run settings: what a resumed run must share with the checkpoint it continues

# A change to one of these makes the resumed run a different run (other batches, another loss, other data).
DEFINING_SETTINGS = (
    "world_size", "global_batch", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_tokens_per_batch", "seed", "loss_type", "beta", "label_smoothing", "nll_weight", "simpo_gamma",
    "discopop_tau", "max_length", "truncation", "layout", "max_tokens_per_row", "optim", "fsdp", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "num_train_pairs", "data_fingerprint",
)
# Accepted with a warning: the saved optimizer and scheduler states keep their own values of these.
STATE_KEPT_SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "adam_beta1",
                       "adam_beta2", "adam_epsilon")
# Accepted with a warning: they take effect from the resumed step on.
CHANGEABLE_SETTINGS = ("max_steps", "num_train_epochs", "max_grad_norm", "bf16", "logging_steps", "save_steps",
                       "save_total_limit")


def run_settings(config: Mapping[str, Any] | Any, *, world_size: int, layout: str | None = None,
                 num_train_pairs: int | None = None, data_fingerprint: str | None = None) -> dict[str, Any]:
    """The settings a checkpoint records for `compare_run_settings`: DPOConfig fields (a DPOConfig or its
    to_dict()), the process count, the global batch, the layout in effect and the tokenized data's
    fingerprint (None: not compared)."""
    values = dict(config) if isinstance(config, Mapping) else config.to_dict()
    settings = {name: values.get(name) for name in DEFINING_SETTINGS + STATE_KEPT_SETTINGS + CHANGEABLE_SETTINGS
                if name in values}
    settings["world_size"] = world_size
    settings["global_batch"] = (values.get("per_device_train_batch_size", 0) or 0) * (
        values.get("gradient_accumulation_steps", 0) or 0) * world_size
    settings["layout"] = layout or values.get("layout")
    settings["num_train_pairs"] = num_train_pairs
    settings["data_fingerprint"] = data_fingerprint
    return settings


def saved_run_settings(state: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings of a trainer state: recorded ones, or rebuilt from the config older versions saved."""
    if isinstance(state.get("run_settings"), Mapping):
        return dict(state["run_settings"])
    return run_settings(state.get("config") or {}, world_size=state.get("world_size", 1),
                        num_train_pairs=state.get("num_train_pairs"))


@dataclass(frozen=True)
class ResumeCheck:
    """The outcome of comparing a checkpoint's run settings with the current ones."""

    refusals: list[str]  # settings that differ and make the runs incompatible, one phrase each
    warnings: list[str]  # settings that differ and are accepted, with what happens to them


def compare_run_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> ResumeCheck:
    """Each differing setting, named with both values. A setting missing (or None) on either side is not
    compared: older checkpoints record fewer."""
    refusals, notes = [], []

    def differs(name: str) -> bool:
        a, b = saved.get(name), current.get(name)
        return a is not None and b is not None and a != b

    for name in DEFINING_SETTINGS:
        if differs(name):
            if name == "data_fingerprint":
                refusals.append("the tokenized training data differs (another file, order, tokenizer, "
                                "max_length or truncation)")
            else:
                refusals.append(f"{name}: checkpoint {saved[name]!r}, now {current[name]!r}")
    for name in STATE_KEPT_SETTINGS:
        if differs(name):
            notes.append(f"{name}: checkpoint {saved[name]!r}, now {current[name]!r}: ignored, the saved optimizer "
                         f"and scheduler state keep {saved[name]!r}")
    for name in CHANGEABLE_SETTINGS:
        if differs(name):
            notes.append(f"{name}: checkpoint {saved[name]!r}, now {current[name]!r}: applies from the resumed step")
    return ResumeCheck(refusals, notes)


def check_resume(checkpoint_dir: str, state: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """compare_run_settings of a checkpoint's trainer state against `current` (`run_settings` of this run):
    raises CheckpointError naming every refused difference; returns the warnings to show."""
    check = compare_run_settings(saved_run_settings(state), current)
    if check.refusals:
        raise CheckpointError(f"cannot resume from {checkpoint_dir!r}: this run differs from the one that wrote it "
                              f"({'; '.join(check.refusals)}); resume with the same settings and data, or "
                              "start a new run in another output_dir")
    return [f"resuming from {checkpoint_dir!r}: {note}" for note in check.warnings]


# ------------------------------------------------------------------------------------------------
# When to save: periodically, and on a stop signal (preemption)


class SaveSchedule:
    """When a periodic checkpoint is due: every `every_steps` optimizer steps and/or every `every_minutes`
    minutes since the last save (0 = that trigger off). With several processes the time-based answer may
    differ between ranks: take rank 0's (broadcast it with the step's other flags)."""

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0, *,
                 clock: Callable[[], float] = time.monotonic):
        if every_steps < 0 or every_minutes < 0:
            raise ValueError(f"every_steps and every_minutes must be >= 0, got {every_steps}, {every_minutes}")
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        self._clock = clock
        self._last = clock()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds) and self._clock() - self._last >= self.every_seconds

    def saved(self) -> None:
        """Call after each checkpoint: the minutes count from here."""
        self._last = self._clock()


class StopRequest:
    """A context manager during which SIGTERM and SIGINT set a flag instead of ending the process, so that
    the training loop can finish its step, write a checkpoint and exit with a message (a preempted job
    then resumes with resume_from_checkpoint='latest'). A second SIGINT (Ctrl-C twice) interrupts at
    once. Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def stop_message(signal_name: str, step: int, checkpoint_dir: str) -> str:
    """What a run stopped by a signal prints last."""
    return (f"stopped by {signal_name} after step {step}: checkpoint saved in {checkpoint_dir}; continue with "
            "--resume-from-checkpoint latest")


class TrainingInterrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; the message says where and how to continue."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        super().__init__(stop_message(signal.Signals(signum).name, step, checkpoint_dir))
        self.signum = signum
        self.step = step
        self.checkpoint_dir = checkpoint_dir


def load_rng_state(checkpoint_dir: str, rank: int) -> None:
    path = os.path.join(checkpoint_dir, f"rng_state_{rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir!r} has no {os.path.basename(path)}: it was written by fewer ranks "
                                "than this run has; resume with the same number of processes")
    set_rng_state(load_state(path))


def load_state(path: str, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) of a checkpoint's optimizer, scheduler or RNG state: tensors, numbers and
    containers only, so that a checkpoint from elsewhere cannot run code; CheckpointError for anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and kin: the file holds more than tensors and numbers
        raise CheckpointError(f"{path!r} does not load with weights_only=True (written by an older version, or not "
                              f"by dpo_fast): {str(e).splitlines()[0]}") from None


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
