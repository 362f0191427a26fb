"""The harness every benchmark shares: timing, peak memory, machine metadata, one results schema.

A benchmark builds a list of `Record`s (one per implementation and mode) and hands them with its
configuration to `write_results`, which writes `benchmarks/results/<name>-<device>.json` and `.md`.

Timing: warmup runs, then `repeats` timed runs, reported as the median (the CPU of the development
machine is shared, so single runs are noisy; `interleaved_times` alternates implementations within
each repeat so a load spike hurts all of them alike). Peak memory: on CUDA `max_memory_allocated`
beyond what was allocated before the call; on the CPU, the allocator's running total from torch's
profiler with memory tracking (every tensor allocation and free inside the call), with an RSS sampler
thread as the fallback when that profiler API is missing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SCHEMA = "dpo_fast.bench/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024


@dataclasses.dataclass
class Record:
    """One implementation in one mode. status: 'ok', 'skipped' (not installed / no device) or 'error'."""

    name: str
    mode: str
    status: str = "ok"
    reason: str = ""
    times_ms: list[float] = dataclasses.field(default_factory=list)
    median_ms: float | None = None
    peak_extra_mb: float | None = None
    time_vs_naive: float | None = None
    memory_vs_naive: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call, device work included in the wall time."""
    synchronize(device)
    cpu0, start = time.process_time(), time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu0) * 1e3


def interleaved_times(fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int, repeats: int,
                      cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall times (ms) of `repeats` calls of each function, the functions alternating within each repeat.

    `cpu_times`, when given, receives the process CPU times too: on a shared CPU they show what the
    wall times lose to other processes.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            wall, cpu = time_once(fn, device)
            times[name].append(wall)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(cpu)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _cpu_peak_from_profiler(fn: Callable[[], Any]) -> float:
    """Peak bytes allocated (net of frees) during `fn`, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocation events carry their signed size; the running sum in time order is the live total.
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocation = torch._C._profiler._EventType.Allocation
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    if not events:
        raise RuntimeError("the profiler recorded no allocation")
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return float(peak)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_from_rss(fn: Callable[[], Any], interval_s: float = 0.002) -> float:
    """Peak resident-set growth during `fn`, sampled by a thread (a lower bound: memory the allocator
    kept from earlier calls is reused without growing the RSS)."""
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _rss_bytes())
    return float(peak - base)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """Peak memory `fn` allocates beyond what exists when it starts (its outputs included), and how
    it was measured."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base), "torch.cuda.max_memory_allocated"
    try:
        return _cpu_peak_from_profiler(fn), "torch.profiler allocation events"
    except (AttributeError, RuntimeError):
        return _cpu_peak_from_rss(fn), "RSS sampler"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # The code that ran: the results a benchmark is writing (and rewrites per contender) do not count.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dpo_fast", "kernels", "csrc", "benchmarks",
                                ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def metadata(device: torch.device) -> dict[str, Any]:
    """Machine, library versions and git commit, for the results file."""
    meta: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = props.name
        meta["gpu_memory_gb"] = round(props.total_memory / 1024**3, 1)
        meta["cuda"] = torch.version.cuda
    if os.environ.get("TRITON_INTERPRET") == "1":
        meta["triton_interpret"] = True
    return meta


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG through a temporary file and os.replace, then close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(records: Sequence[Record]) -> str:
    lines = [
        "| mode | implementation | median ms | median CPU ms | peak extra MB | time vs naive | memory vs naive "
        "| note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        note = r.reason if r.status != "ok" else r.extra.get("note", "")
        lines.append(
            f"| {r.mode} | {r.name} | {_fmt(r.median_ms)} | {_fmt(r.extra.get('median_cpu_ms'))} | "
            f"{_fmt(r.peak_extra_mb)} | {_fmt(r.time_vs_naive, 2)} | "
            f"{_fmt(r.memory_vs_naive, 3)} | {note} |"
        )
    return "\n".join(lines)


def write_results(name: str, device: torch.device, config: dict[str, Any], records: Sequence[Record],
                  extra: dict[str, Any] | None = None, out_dir: Path = RESULTS_DIR,
                  notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Writes `<name>-<device type>.json` (schema SCHEMA) and a markdown table next to it."""
    meta = metadata(device)
    payload = {
        "schema": SCHEMA,
        "benchmark": name,
        "device": device.type,
        "meta": meta,
        "config": config,
        "results": [dataclasses.asdict(r) for r in records],
        "extra": extra or {},
    }
    stem = f"{name}-{device.type}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    _write_atomic(json_path, json.dumps(payload, indent=2) + "\n")
    header = [
        f"# {name} benchmark on {meta.get('gpu', meta['cpu'])} ({device.type})",
        "",
        f"{meta['date_utc']}, commit {meta['git_commit']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['torch_threads']} threads.",
        "",
        "Config: " + ", ".join(f"{k}={v}" for k, v in config.items()),
        "",
    ]
    body = [markdown_table(records), ""]
    if extra:
        body += ["", "```", json.dumps(extra, indent=2), "```", ""]
    body += [f"- {n}" for n in notes]
    _write_atomic(md_path, "\n".join(header + body) + "\n")
    return json_path, md_path


# Public names for the helpers other benchmarks use (the underscored names stay for their callers).
write_atomic = _write_atomic
fmt = _fmt
