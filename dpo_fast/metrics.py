"""Training metrics: one JSON line per logging step, TensorBoard when installed, a PNG chart at the end.

Metric names are TRL's (`rewards/chosen`, `rewards/accuracies`, `logps/chosen`, ...) so dashboards and
scripts written for TRL read ours unchanged.
"""

from __future__ import annotations

import json
import math
import os
import warnings
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
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
