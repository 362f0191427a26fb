"""Training metrics: one JSON line per logging step, TensorBoard when installed, a PNG chart at the end.

Metric names are TRL's (`rewards/chosen`, `rewards/accuracies`, `logps/chosen`, ...) so dashboards and
scripts written for TRL read ours unchanged.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .checkpoint import atomic_path

METRICS_FILE = "metrics.jsonl"
CHART_FILE = "metrics.png"


class MetricsLogger:
    """Appends metric records to `output_dir/metrics.jsonl` (and TensorBoard); only rank 0 writes."""

    def __init__(self, output_dir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.output_dir = output_dir
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.history: list[dict[str, Any]] = []
        self._writer = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                self._writer = _tensorboard_writer(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        # One write call per line, flushed: a crash leaves whole lines, at worst losing the last one.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is the optional extra dpo-fast[tensorboard]
        return None
    return SummaryWriter(log_dir=log_dir)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics file. A last line without its newline that is not valid JSON is what a
    crash mid-write leaves: it is dropped with a warning. Any other invalid line raises ValueError naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                warnings.warn(f"{path}: dropped a partial last line (a crash while it was written): {line[:60]!r}",
                              stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
    return records


def truncate_metrics(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (resuming from that step logs the later ones again), and drop a
    partial last line; the file is rewritten atomically. Nothing when the file does not exist."""
    if not os.path.isfile(path):
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_metrics(history: list[dict[str, Any]], path: str) -> str | None:
    """Loss, reward accuracy and reward margin against the step, as a PNG (matplotlib Agg); atomic write.

    Returns the path, or None when there is nothing to plot or matplotlib is missing.
    """
    train = [r for r in history if "loss" in r]
    if not train:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no metrics chart", stacklevel=2)
        return None
    # A Figure without pyplot renders through Agg: no global backend switch, no GUI, safe in any thread.
    fig = Figure(figsize=(12, 3.5), constrained_layout=True)
    axes = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    for ax, key, title in zip(axes, ("loss", "rewards/accuracies", "rewards/margins"),
                              ("DPO loss", "reward accuracy", "reward margin")):
        ys = [r.get(key, float("nan")) for r in train]
        ys = [float(y) if isinstance(y, (int, float)) else float("nan") for y in ys]
        ax.plot(steps, ys, marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


# ------------------------------------------------------------------------------------------------
# Divergence: non-finite steps, a dead gradient, a loss explosion

# Slots of TrainingHealth's device state, read to the host in one copy.
_STEPS, _NONFINITE, _NONFINITE_RUN, _FIRST_NONFINITE, _STOP_STEP, _ZERO_RUN, _ZERO_STEP, _BASELINE, _JUMP_STEP, \
    _JUMP_LOSS, _JUMP_BASELINE, _SLOTS = range(12)
# Below this running-mean loss a jump is measured against it instead (a near-zero loss rising to 1 is learning
# something, not a blow-up by orders of magnitude).
_BASELINE_FLOOR = 0.1
_EMA = 0.9


class TrainingDiverged(RuntimeError):
    """A run stopped because too many consecutive steps were non-finite (`HealthReport.stop_message`)."""


@dataclass(frozen=True)
class HealthReport:
    """What `TrainingHealth.read` found. warnings: new since the previous read, one line each.
    stop_message: set when too many consecutive steps were non-finite (the run must stop)."""

    steps: int
    nonfinite_steps: int
    warnings: list[str]
    stop_message: str | None


class TrainingHealth:
    """Watches each step's loss and gradient norm on their device: `update` queues a few scalar kernels and
    never waits for the device; `read` copies the counters to the host once (at logging steps and before
    a checkpoint is written).

    A step is non-finite when its loss or gradient norm is NaN or infinite; `update` returns that as a
    0-dim bool tensor so the caller can skip the step's update. max_nonfinite_steps consecutive ones stop
    the run. Also reported: the gradient norm exactly 0 for zero_grad_steps steps in a row (a dead model),
    and a loss above loss_jump times its running mean (a divergence).
    """

    def __init__(self, *, max_nonfinite_steps: int = 3, zero_grad_steps: int = 5, loss_jump: float = 100.0,
                 device: Any = None):
        if max_nonfinite_steps < 1 or zero_grad_steps < 1 or not loss_jump > 1:
            raise ValueError("max_nonfinite_steps and zero_grad_steps must be >= 1 and loss_jump > 1, got "
                             f"{max_nonfinite_steps}, {zero_grad_steps}, {loss_jump}")
        import torch

        self.max_nonfinite_steps = max_nonfinite_steps
        self.zero_grad_steps = zero_grad_steps
        self.loss_jump = loss_jump
        self._state = torch.zeros(_SLOTS, dtype=torch.float64, device=device)
        for slot in (_FIRST_NONFINITE, _STOP_STEP, _ZERO_STEP, _JUMP_STEP):
            self._state[slot] = -1.0
        self._state[_BASELINE] = float("nan")
        self._seen = {"nonfinite": 0, "zero": -1.0, "jump": -1.0}

    def update(self, step: int, loss: Any, grad_norm: Any):
        """Account for optimizer step `step` (loss and grad_norm: 0-dim tensors or floats); returns the
        0-dim bool tensor "this step is finite" on the state's device, without a host sync."""
        import torch

        s = self._state
        loss = torch.as_tensor(loss).detach().to(s.device, torch.float64)
        grad_norm = torch.as_tensor(grad_norm).detach().to(s.device, torch.float64)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad = (~finite).double()
        s[_STEPS] += 1
        s[_NONFINITE] += bad
        s[_NONFINITE_RUN] = (s[_NONFINITE_RUN] + 1) * bad
        s[_FIRST_NONFINITE] = torch.where((s[_FIRST_NONFINITE] < 0) & ~finite, step, s[_FIRST_NONFINITE])
        s[_STOP_STEP] = torch.where((s[_STOP_STEP] < 0) & (s[_NONFINITE_RUN] >= self.max_nonfinite_steps), step,
                                    s[_STOP_STEP])
        s[_ZERO_RUN] = (s[_ZERO_RUN] + 1) * (finite & (grad_norm == 0)).double()
        s[_ZERO_STEP] = torch.where(s[_ZERO_RUN] == self.zero_grad_steps, step, s[_ZERO_STEP])
        baseline = s[_BASELINE]
        known = ~torch.isnan(baseline)
        jumped = finite & known & (loss > self.loss_jump * baseline.clamp(min=_BASELINE_FLOOR))
        s[_JUMP_STEP] = torch.where(jumped, step, s[_JUMP_STEP])
        s[_JUMP_LOSS] = torch.where(jumped, loss, s[_JUMP_LOSS])
        s[_JUMP_BASELINE] = torch.where(jumped, baseline, s[_JUMP_BASELINE])
        # A jumped loss does not move the baseline: later steps are still measured against the sane level.
        updated = torch.where(known, _EMA * baseline + (1 - _EMA) * loss, loss)
        s[_BASELINE] = torch.where(finite & ~jumped, updated, baseline)
        return finite

    def read(self) -> HealthReport:
        """Copy the counters to the host (one transfer) and word what is new since the previous read."""
        v = self._state.tolist()
        notes = []
        nonfinite = int(v[_NONFINITE])
        if nonfinite > self._seen["nonfinite"]:
            notes.append(f"non-finite loss or gradient norm at {nonfinite - self._seen['nonfinite']} step(s) since "
                         f"the last report (first at step {int(v[_FIRST_NONFINITE])}); those updates were skipped")
            self._seen["nonfinite"] = nonfinite
        if v[_ZERO_STEP] >= 0 and v[_ZERO_STEP] != self._seen["zero"]:
            notes.append(f"step {int(v[_ZERO_STEP])}: the gradient norm has been exactly 0 for "
                         f"{self.zero_grad_steps} steps in a row: the model may be dead (e.g. all-zero logits after "
                         "a divergence); lower the learning rate")
            self._seen["zero"] = v[_ZERO_STEP]
        if v[_JUMP_STEP] >= 0 and v[_JUMP_STEP] != self._seen["jump"]:
            notes.append(f"step {int(v[_JUMP_STEP])}: the loss jumped to {v[_JUMP_LOSS]:.3g}, "
                         f"{v[_JUMP_LOSS] / max(v[_JUMP_BASELINE], _BASELINE_FLOOR):.0f}x its running mean "
                         f"{v[_JUMP_BASELINE]:.3g}: training may be diverging; lower the learning rate")
            self._seen["jump"] = v[_JUMP_STEP]
        stop = None
        if v[_STOP_STEP] >= 0:
            stop = (f"stopped at step {int(v[_STOP_STEP])}: {self.max_nonfinite_steps} consecutive steps had a "
                    f"non-finite loss or gradient norm ({nonfinite} in all); lower the learning rate, or use "
                    "bf16 instead of fp16")
        return HealthReport(int(v[_STEPS]), nonfinite, notes, stop)
