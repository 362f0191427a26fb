"""Time and fill of `dpo_fast.data.packing`: the C++ packer, its pure-Python fallback, and TRL's BFD.

Input: `--items` preference-pair lengths drawn from a lognormal (median 600 tokens, sigma 0.9, clipped to
[16, capacity]), packed into bins of `--capacity` tokens. Two APIs, both backends each:
  list API  `pack`       -> bins as lists of item indexes (one Python int per item)
  flat API  `pack_flat`  -> the same bins as two int64 numpy arrays (PackedBins: items, offsets)
Each row says its input: the same Python list of ints, or ("numpy input") the same int64 array. A row's
"time vs naive" and "CPU vs python" compare it with the pure-Python backend on the same API, algorithm and
input; the summary's speedups are the medians of those (pure-Python time / C++ time).

TRL's `pack_dataset(strategy="bfd")` runs, when trl is installed, on a datasets.Dataset whose
`input_ids` rows have those lengths (uint8 token ids, the cheapest payload for it to move): once with
one map batch for the whole dataset (a global BFD, like ours) and once with datasets' default batches
of 1000 rows (what a plain call does). It also copies the token data into packed rows, which our
packer leaves to the layout builder, so its time is an upper bound on its packing step.

Times are the median of `--repeats` calls (`--trl-repeats` for TRL), implementations interleaved;
wall-clock and process CPU time are both reported because the development machine's CPUs are shared.

    python benchmarks/bench_packing.py                    # 1,000,000 pairs, capacity 8192
    python benchmarks/bench_packing.py --items 100000     # quicker

Writes benchmarks/results/packing-cpu.json and .md (schema of benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from dpo_fast.data import packing  # noqa: E402


def make_lengths(items: int, capacity: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(600.0), 0.9, items), 16, capacity).astype(np.int64)


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU milliseconds of one call, and its result."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3, out


def trl_runs(lengths: np.ndarray, capacity: int) -> dict[str, Callable[[], tuple[int, int]]]:
    """TRL pack_dataset calls returning (bins, tokens), or {} when trl is not importable."""
    try:
        import datasets
        import pyarrow as pa
        from trl.data_utils import pack_dataset
    except ImportError:
        return {}
    datasets.disable_progress_bars()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), dtype=np.uint8)))
    dataset = datasets.Dataset(pa.table({"input_ids": ids}))

    def run(batch_size: int | None) -> tuple[int, int]:
        kwargs: dict[str, Any] = {"keep_in_memory": True}
        if batch_size is not None:
            kwargs["batch_size"] = batch_size
        packed = pack_dataset(dataset, capacity, strategy="bfd", map_kwargs=kwargs)
        rows = packed.with_format("arrow")[:]
        return rows.num_rows, int(rows.column("seq_lengths").combine_chunks().flatten().to_numpy().sum())

    return {"trl pack_dataset bfd, one batch": lambda: run(len(dataset)),
            "trl pack_dataset bfd, default batches": lambda: run(None)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=8192)
    parser.add_argument("--world-size", type=int, default=8, help="for the balanced-steps row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-repeats", type=int, default=1, help="TRL takes minutes at 10^6 rows")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when installed")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)

    array = make_lengths(args.items, args.capacity, args.seed)
    lengths = array.tolist()
    cap = args.capacity
    has_cpp = packing._cpp_module() is not None

    def run(api: str, inputs: Any, algorithm: str, backend: str, world_size: int = 1) -> Callable[[], Any]:
        fn = packing.pack_flat if api == "flat" else packing.pack
        return lambda: fn(inputs, cap, algorithm=algorithm, world_size=world_size, backend=backend)

    # name -> (call, name of the pure-Python row it is compared with)
    ours: dict[str, tuple[Callable[[], Any], str]] = {}
    backends = ["python", "cpp"] if has_cpp else ["python"]
    for backend in backends:
        for algo in ("bfd", "ffd"):
            ours[f"{backend} {algo}"] = (run("list", lengths, algo, backend), f"python {algo}")
            if backend == "cpp":
                # No python twin for this row: the fallback would convert the array with tolist() first.
                ours[f"cpp {algo}, numpy input"] = (run("list", array, algo, backend), f"python {algo}")
    if has_cpp:
        ours[f"cpp bfd, world_size={args.world_size}"] = (run("list", lengths, "bfd", "cpp", args.world_size),
                                                          "python bfd")
    for backend in backends:
        for algo in ("bfd", "ffd"):
            ours[f"{backend} flat {algo}"] = (run("flat", lengths, algo, backend), f"python flat {algo}")
            ours[f"{backend} flat {algo}, numpy input"] = (run("flat", array, algo, backend),
                                                          f"python flat {algo}, numpy input")
    trl = {} if args.no_trl else trl_runs(array, cap)

    wall: dict[str, list[float]] = {name: [] for name in [*ours, *trl]}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    outputs: dict[str, Any] = {}
    for repeat in range(max(args.repeats, args.trl_repeats if trl else 0)):
        todo = [(name, call) for name, (call, _) in ours.items()] if repeat < args.repeats else []
        todo += list(trl.items()) if repeat < args.trl_repeats else []
        for name, fn in todo:
            w, c, out = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
            outputs[name] = out
            del out

    total = int(array.sum())
    lower_bound = -(-total // cap)
    records = []
    for name in wall:
        if name in ours:
            world_size = args.world_size if "world_size" in name else 1
            stats = packing.pack_stats(array, outputs[name], cap, world_size=world_size)
            num_bins, tokens, spread = stats.num_bins, stats.total_tokens, stats.max_step_spread
        else:
            (num_bins, tokens), spread = outputs[name], None
        extra = {
            "median_cpu_ms": round(statistics.median(cpu[name]), 1),
            "cpu_times_ms": [round(t, 1) for t in cpu[name]],
            "bins": num_bins,
            "fill_efficiency": tokens / (num_bins * cap),
            "lower_bound_ratio": lower_bound / num_bins,
        }
        if spread is not None and "world_size" in name:
            extra["max_step_spread"] = spread
        records.append(common.Record(name=name, mode=f"{args.items} pairs", times_ms=[round(t, 1) for t in wall[name]],
                                     median_ms=round(common.median(wall[name]), 1), extra=extra))
    if not trl:
        records.append(common.Record(name="trl pack_dataset bfd", mode=f"{args.items} pairs", status="skipped",
                                     reason="--no-trl" if args.no_trl else "trl not importable"))
    if not has_cpp:
        records.append(common.Record(name="cpp", mode=f"{args.items} pairs", status="skipped",
                                     reason="dpo_fast._packing_cpp not built"))

    for r in records:
        if r.status != "ok":
            continue
        r.extra["note"] = (f"fill {r.extra['fill_efficiency']:.4%}, LB/bins {r.extra['lower_bound_ratio']:.4%}, "
                           f"{r.extra['bins']} bins")
        if r.name not in ours:  # TRL: compared with our pure-Python BFD over the same lengths
            baseline_name = "python bfd"
        else:
            baseline_name = ours[r.name][1]
        r.extra["baseline"] = baseline_name
        r.time_vs_naive = round(r.median_ms / common.median(wall[baseline_name]), 4)
        r.extra["cpu_vs_python"] = round(common.median(cpu[r.name]) / common.median(cpu[baseline_name]), 4)
        r.extra["note"] += f", CPU vs {baseline_name} {r.extra['cpu_vs_python']:.4f}"

    summary: dict[str, Any] = {"total_tokens": total, "lower_bound_bins": lower_bound,
                               "versions": {"numpy": np.__version__}}
    if has_cpp:
        # Keys: cpp_speedup_<algo>_<clock> (list API, list input), flat_cpp_speedup_<algo>_<clock> (flat API,
        # list input), flat_cpp_speedup_<algo>_numpy_<clock> (flat API, numpy input, both backends).
        for algo in ("bfd", "ffd"):
            for key, row in ((f"cpp_speedup_{algo}", f"cpp {algo}"), (f"flat_cpp_speedup_{algo}", f"cpp flat {algo}"),
                             (f"flat_cpp_speedup_{algo}_numpy", f"cpp flat {algo}, numpy input")):
                base = ours[row][1]
                summary[f"{key}_cpu"] = round(common.median(cpu[base]) / common.median(cpu[row]), 1)
                summary[f"{key}_wall"] = round(common.median(wall[base]) / common.median(wall[row]), 1)
        summary["min_fill_efficiency_ours"] = min(r.extra["fill_efficiency"] for r in records
                                                  if r.status == "ok" and r.name in ours)
    try:
        import trl as trl_module

        summary["versions"]["trl"] = trl_module.__version__
    except ImportError:
        summary["versions"]["trl"] = None
    config = {"items": args.items, "capacity": cap, "lengths": "lognormal(median 600, sigma 0.9) clipped to [16, cap]",
              "repeats": args.repeats, "trl_repeats": args.trl_repeats, "seed": args.seed,
              "backend_default": packing.backend()}
    notes = [
        "time vs naive: wall-clock median over the row's baseline (extra.baseline: the pure-Python backend on the "
        "same API, algorithm and input; lower is faster). CPU vs python: the same with process CPU time.",
        "The C++ packer places a run of equal lengths a bin at a time and reads numpy input in place; the "
        "pure-Python fallback places items one by one (same bins). Both return identical output.",
        "LB/bins: ceil(total tokens / capacity) over bins used; 100% is provably optimal.",
        "TRL rows also copy the token payload into packed rows; ours return item indexes only.",
    ]
    print(common.markdown_table(records))
    print({k: v for k, v in summary.items() if k != "versions"})
    json_path, md_path = common.write_results("packing", torch.device("cpu"), config, records, extra=summary,
                                              notes=notes, out_dir=args.out_dir)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
