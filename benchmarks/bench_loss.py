"""Forward + backward time and peak memory of the DPO loss, every implementation side by side.

Modes:
  linear: from hidden states and the lm_head weight (`linear_dpo_loss`), gradients of both.
  fused:  from logits (`fused_dpo_loss`), gradient of the logits.

Implementations: naive (`dpo_fast.loss.oracle` with dtype=None: full logits and log_softmax in the
input dtype, what TRL did before fusing), the torch backend (public function, and each schedule on
its own: recompute, one-pass with one or two scratch buffers), the triton backend (CUDA only), and,
when installed, Liger-Kernel's `LigerFusedLinearDPOLoss`, TRL's `selective_log_softmax` path (full logits),
and TRL 1.16's chunked fused lm_head (`trl.kernels.ChunkedLogProbFunction`, what its DPOTrainer runs).

    python benchmarks/bench_loss.py                 # CPU: fp32, 4 pairs x 512 tokens, H=512, V=32000
    python benchmarks/bench_loss.py --device cuda   # bf16, 8 pairs x 1024, H=4096, V=128256

Writes benchmarks/results/loss-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import dpo_fast  # noqa: E402
from dpo_fast.loss import ops, oracle  # noqa: E402
from dpo_fast.loss.formulas import LossConfig  # noqa: E402
from dpo_fast.loss.functional import _finish, _FlatHidden  # noqa: E402
from dpo_fast.loss.ops import schedule, torch_one_pass  # noqa: E402

IGNORE = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {
    "cpu": dict(pairs=4, seq_len=512, hidden=512, vocab=32000, dtype="float32", repeats=5, warmup=1),
    "cuda": dict(pairs=8, seq_len=1024, hidden=4096, vocab=128256, dtype="bfloat16", repeats=10, warmup=2),
}


class Skip(Exception):
    """An implementation that cannot run here (not installed, needs CUDA)."""


def make_inputs(args, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, t, h, v = 2 * args.pairs, args.seq_len, args.hidden, args.vocab
    # Scales of a trained model's last layer: logits with a spread of a few units.
    hidden = torch.randn(rows, t, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (rows, t), generator=g)
    prompt = int(args.prompt_frac * t)
    labels[:, :prompt] = IGNORE
    labels = labels.to(device)
    ref_c = (torch.randn(args.pairs, generator=g) - 10.0 * (t - prompt)).to(device)
    ref_r = (torch.randn(args.pairs, generator=g) - 10.0 * (t - prompt)).to(device)
    # The float16 row's copies of the same values (CUDA only: the triton rows).
    half = tuple(t.half().requires_grad_() for t in (hidden, weight)) if device.type == "cuda" else None
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), labels=labels, ref_c=ref_c,
                ref_r=ref_r, half=half)


def _backward(loss: torch.Tensor, *leaves: torch.Tensor) -> None:
    for leaf in leaves:
        leaf.grad = None
    loss.backward()


# --- linear mode -------------------------------------------------------------------------------------

def linear_impls(inp: dict, device: torch.device, beta: float) -> dict[str, Callable[[], None]]:
    h, w, y, rc, rr = inp["hidden"], inp["weight"], inp["labels"], inp["ref_c"], inp["ref_r"]
    config = LossConfig(beta=beta)
    v = w.shape[0]

    def naive():
        _backward(oracle.linear_dpo_loss(h, w, y, rc, rr, beta=beta, dtype=None).loss, h, w)

    def torch_public():
        _backward(dpo_fast.linear_dpo_loss(h, w, y, rc, rr, beta=beta, backend="torch").loss, h, w)

    def torch_recompute():
        # functional.linear_dpo_loss's fallback path, taken on its own.
        flat = _FlatHidden(h, y, None, IGNORE, v)
        tok = ops.linear_token_logps(flat.values, w, flat.labels, bias=None, ignore_index=IGNORE, backend="torch")
        _backward(_finish(config, flat, flat.sequence_sums(tok), rc, rr).loss, h, w)

    def one_pass(single: bool):
        def run():
            flat = _FlatHidden(h, y, None, IGNORE, v)
            out = torch_one_pass.linear_dpo_loss_one_pass(
                config, flat.values, w, None, flat.labels, flat.segment_ids, flat.num_sequences, IGNORE, rc, rr,
                None, single_buffer=single)
            _backward(out.loss, h, w)
        return run

    impls = {
        "naive": naive,
        "torch (linear_dpo_loss)": torch_public,
        "torch recompute": torch_recompute,
        "torch one-pass, 1 buffer": one_pass(True),
        "torch one-pass, 2 buffers": one_pass(False),
    }
    if device.type == "cuda":
        impls.update(triton_linear_impls(inp, beta))
    impls["liger LigerFusedLinearDPOLoss"] = _liger_linear(h, w, y, beta)
    impls["trl selective_log_softmax"] = _trl_linear(h, w, y, rc, rr, beta)
    impls["trl 1.16 chunked lm_head"] = _trl_chunked_linear(h, w, y, rc, rr, beta)
    return impls


def triton_linear_impls(inp: dict, beta: float) -> dict[str, Callable[[], None]]:
    """The triton backend's rows: the public default (one-pass for this sigmoid batch), the two-pass schedule
    on the same loss, a second pair-separable loss (bco_pair), a batch-coupled one (aot: two-pass), and
    float16 (two-pass). `inp["half"]` holds the fp16 copies of hidden and weight."""
    h, w, y, rc, rr = inp["hidden"], inp["weight"], inp["labels"], inp["ref_c"], inp["ref_r"]
    h16, w16 = inp["half"]
    v = w.shape[0]

    def public(loss_type: str, hidden, weight):
        return lambda: _backward(dpo_fast.linear_dpo_loss(hidden, weight, y, rc, rr, beta=beta, loss_type=loss_type,
                                                          backend="triton").loss, hidden, weight)

    def two_pass():
        # functional.linear_dpo_loss's token-level path, taken on its own.
        flat = _FlatHidden(h, y, None, IGNORE, v)
        tok = ops.linear_token_logps(flat.values, w, flat.labels, bias=None, ignore_index=IGNORE, backend="triton")
        _backward(_finish(LossConfig(beta=beta), flat, flat.sequence_sums(tok), rc, rr).loss, h, w)

    return {
        "triton (linear_dpo_loss, default)": public("sigmoid", h, w),
        "triton two-pass": two_pass,
        "triton bco_pair (default)": public("bco_pair", h, w),
        "triton aot (default)": public("aot", h, w),
        "triton float16 (default)": public("sigmoid", h16, w16),
    }


def linear_schedule(name: str, inp: dict, beta: float) -> str | None:
    """The schedule a linear row of dpo_fast runs (from `ops.linear_loss_schedule_for`, the function that
    picks it), for its roofline; None for the other implementations."""
    fixed = {"triton two-pass": schedule.TRITON_TWO_PASS, "torch recompute": schedule.TORCH_RECOMPUTE,
             "torch one-pass, 1 buffer": schedule.TORCH_ONE_PASS, "torch one-pass, 2 buffers": schedule.TORCH_ONE_PASS}
    backend = name.split(" ")[0]
    if name in fixed or backend not in ("triton", "torch"):
        return fixed.get(name)
    h, w = inp["half"] if "float16" in name else (inp["hidden"], inp["weight"])
    loss_type = next((t for t in ("bco_pair", "aot") if t in name), "sigmoid")
    flat = _FlatHidden(h.detach(), inp["labels"], None, IGNORE, w.shape[0])
    return ops.linear_loss_schedule_for(LossConfig(beta=beta, loss_type=loss_type), flat, w, None, backend=backend)


def _trl_chunked_linear(h, w, y, rc, rr, beta) -> Callable[[], None]:
    """TRL 1.16's fused lm_head (`add_fused_lm_head`): its chunked log-prob Function over scored tokens, with
    the chunk size its DPOTrainer uses, then the sigmoid loss on the sequence sums."""
    def run():
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        except ImportError as e:
            raise Skip("trl >= 1.16 not installed (pip install 'trl>=1.16')") from e
        rows, t, hidden_size = h.shape
        mask = y != IGNORE
        flat_mask = mask.reshape(-1)
        scored_h = h.reshape(-1, hidden_size)[flat_mask]
        out = ChunkedLogProbFunction.apply(scored_h, w, None, y.reshape(-1)[flat_mask], 1.0,
                                           _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))
        tok = out[0].new_zeros(rows * t).masked_scatter(flat_mask, out[0])
        seq = tok.view(rows, t).sum(-1)
        b = rows // 2
        delta = (seq[:b] - rc) - (seq[b:] - rr)
        _backward(-torch.nn.functional.logsigmoid(beta * delta).mean(), h, w)
    return run


def _liger_linear(h, w, y, beta) -> Callable[[], None]:
    def run():
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as e:
            raise Skip("liger-kernel not installed (pip install liger-kernel)") from e
        if h.device.type != "cuda":
            raise Skip("Liger's chunked losses are benchmarked on CUDA only")
        # Reference log-probs are precomputed in the other implementations: no reference model here.
        wanted = dict(ignore_index=IGNORE, beta=beta, compute_nll_loss=False, use_ref_model=False)
        params = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
        loss_fn = LigerFusedLinearDPOLoss(**{k: val for k, val in wanted.items() if k in params})
        out = loss_fn(w, h, y)
        loss = out[0] if isinstance(out, tuple) else out
        _backward(loss, h, w)
    return run


def _trl_selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError as e:
        raise Skip("trl not installed (pip install trl)") from e
    return selective_log_softmax


def _trl_loss(logits, y, rc, rr, beta):
    """TRL's DPOTrainer path: per-token log-probs by selective_log_softmax over full logits, then sigmoid."""
    selective_log_softmax = _trl_selective_log_softmax()
    mask = y != IGNORE
    tok = selective_log_softmax(logits, torch.where(mask, y, 0)) * mask
    seq = tok.sum(-1)
    b = seq.shape[0] // 2
    delta = (seq[:b] - rc) - (seq[b:] - rr)
    return -torch.nn.functional.logsigmoid(beta * delta).mean()


def _trl_linear(h, w, y, rc, rr, beta) -> Callable[[], None]:
    def run():
        _backward(_trl_loss(h @ w.T, y, rc, rr, beta), h, w)
    return run


# --- fused (logits-in) mode --------------------------------------------------------------------------

def fused_impls(logits: torch.Tensor, inp: dict, device: torch.device, beta: float) -> dict[str, Callable[[], None]]:
    y, rc, rr = inp["labels"], inp["ref_c"], inp["ref_r"]
    impls = {
        "naive": lambda: _backward(oracle.fused_dpo_loss(logits, y, rc, rr, beta=beta, dtype=None).loss, logits),
        "torch (fused_dpo_loss)": lambda: _backward(
            dpo_fast.fused_dpo_loss(logits, y, rc, rr, beta=beta, backend="torch").loss, logits),
    }
    if device.type == "cuda":
        impls["triton"] = lambda: _backward(
            dpo_fast.fused_dpo_loss(logits, y, rc, rr, beta=beta, backend="triton").loss, logits)
    impls["trl selective_log_softmax"] = lambda: _backward(_trl_loss(logits, y, rc, rr, beta), logits)
    return impls


# --- roofline ------------------------------------------------------------------------------------------

def measure_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """Achieved matmul rate (TFLOP/s) in `dtype` and copy bandwidth (GB/s, bytes read + written)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = common.interleaved_times({"mm": lambda: a @ b}, device, warmup=2, repeats=5)["mm"]
    tflops = 2 * n**3 / (common.median(times) / 1e3) / 1e12
    numel = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = common.interleaved_times({"copy": lambda: dst.copy_(src)}, device, warmup=2, repeats=5)["copy"]
    gbps = 2 * src.numel() * 4 / (common.median(times) / 1e3) / 1e9
    return {"matmul_tflops": round(tflops, 3), "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_size": n, "copy_gb_per_s": round(gbps, 1)}


def roofline_ms(mode: str, args, rates: dict, elem_bytes: int, flops_per_nhv: int = 6,
                matmul_tflops: float | None = None) -> float:
    """linear: flops_per_nhv * N*H*V flops at the matmul rate (6 = forward logits, dhidden, dweight; 8 adds the
    two-pass schedule's recomputed logits); fused: the logits read forward, read again and the gradient
    written backward, at the copy rate."""
    n = 2 * args.pairs * args.seq_len
    if mode == "linear":
        tflops = rates["matmul_tflops"] if matmul_tflops is None else matmul_tflops
        return flops_per_nhv * n * args.hidden * args.vocab / (tflops * 1e12) * 1e3
    return 3 * n * args.vocab * elem_bytes / (rates["copy_gb_per_s"] * 1e9) * 1e3


def annotate_roofline(rec: common.Record, args, rates: dict, elem: int, inp: dict, input_grad_mb: float) -> None:
    """Roofline, its ratio and the memory beyond the inputs' gradients, into rec.extra and its note."""
    flops, tflops = 6, None
    if rec.mode == "linear":
        chosen = linear_schedule(rec.name, inp, args.beta)
        flops = 8 if chosen in (schedule.TRITON_TWO_PASS, schedule.TORCH_RECOMPUTE) else 6
        if "float16" in rec.name:
            tflops = rates.get("matmul_tflops_float16")
        if chosen is not None:
            rec.extra["schedule"] = chosen
    roof = roofline_ms(rec.mode, args, rates, elem, flops, tflops)
    rec.extra["roofline_ms"] = round(roof, 2)
    rec.extra["roofline_fraction"] = round(roof / rec.median_ms, 3)
    what = f"{flops}NHV" if rec.mode == "linear" else "copy"
    parts = [rec.extra.get("note", ""), f"x{rec.median_ms / roof:.2f} of the {what} roofline"]
    if rec.mode == "fused":
        parts.append(f"{100 * roof / rec.median_ms:.0f}% of copy bandwidth")
    if rec.peak_extra_mb is not None:
        rec.extra["beyond_input_grads_mb"] = round(rec.peak_extra_mb - input_grad_mb, 1)
        parts.append(f"{rec.extra['beyond_input_grads_mb']} MB beyond the inputs' gradients")
    rec.extra["note"] = ", ".join(p for p in parts if p)


# --- driver --------------------------------------------------------------------------------------------

def run_mode(mode: str, impls: dict[str, Callable[[], None]], device: torch.device, args,
             leaves: list[torch.Tensor]) -> list[common.Record]:
    records: dict[str, common.Record] = {}
    runnable: dict[str, Callable[[], None]] = {}
    for name, fn in impls.items():
        rec = common.Record(name=name, mode=mode)
        records[name] = rec
        if args.only and name != "naive" and not any(s in name for s in args.only):
            rec.status, rec.reason = "skipped", "not selected (--only)"
            continue
        try:
            fn()  # also the first warmup run; a failure here marks the implementation, not the benchmark
            runnable[name] = fn
        except Skip as e:
            rec.status, rec.reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - an implementation's failure is a result to report
            rec.status, rec.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        gc.collect()
    print(f"[{mode}] timing {len(runnable)} implementations x {args.repeats} repeats", flush=True)
    cpu_times: dict[str, list[float]] = {}
    times = common.interleaved_times(runnable, device, warmup=max(0, args.warmup - 1), repeats=args.repeats,
                                     cpu_times=cpu_times if device.type == "cpu" else None)
    for name, ts in times.items():
        records[name].times_ms = [round(t, 2) for t in ts]
        records[name].median_ms = round(common.median(ts), 2)
        if name in cpu_times:
            records[name].extra["cpu_times_ms"] = [round(t, 2) for t in cpu_times[name]]
            records[name].extra["median_cpu_ms"] = round(common.median(cpu_times[name]), 2)
    if not args.no_memory:
        for name, fn in runnable.items():
            # Gradients left by the previous run would be freed inside the measured call and lower the
            # peak by their size (on CUDA always; on the CPU when an earlier profiled run allocated them:
            # measured 125 instead of 196 MiB for the recompute schedule). A training step starts with
            # the gradients zeroed or None, as here.
            for leaf in leaves:
                leaf.grad = None
            peak, how = common.peak_extra_bytes(fn, device)
            records[name].peak_extra_mb = round(peak / common.MB, 1)
            records[name].extra["memory_method"] = how
    base = records.get("naive")
    for rec in records.values():
        if base is not None and base.median_ms and rec.median_ms:
            rec.time_vs_naive = round(rec.median_ms / base.median_ms, 3)
            # Runs interleave, so repeat r of each implementation saw about the same load: the median of
            # the per-repeat ratios is steadier than the ratio of medians on a shared machine.
            paired = [t / t0 for t, t0 in zip(rec.times_ms, base.times_ms)]
            rec.extra["paired_time_vs_naive"] = round(common.median(paired), 3)
            if "cpu_times_ms" in rec.extra and "cpu_times_ms" in base.extra:
                rec.extra["cpu_time_vs_naive"] = round(
                    rec.extra["median_cpu_ms"] / base.extra["median_cpu_ms"], 3)
            note = f"paired time x{rec.extra['paired_time_vs_naive']:.2f}"
            if "cpu_time_vs_naive" in rec.extra:
                note += f", CPU time x{rec.extra['cpu_time_vs_naive']:.2f}"
            rec.extra["note"] = note
        if base is not None and base.peak_extra_mb and rec.peak_extra_mb is not None:
            rec.memory_vs_naive = round(rec.peak_extra_mb / base.peak_extra_mb, 4)
        print(f"  {name_line(rec)}", flush=True)
    return list(records.values())


def name_line(r: common.Record) -> str:
    if r.status != "ok":
        return f"{r.name}: {r.status} ({r.reason})"
    return (f"{r.name}: {r.median_ms} ms, {r.peak_extra_mb} MB extra, x{r.time_vs_naive} time, "
            f"x{r.memory_vs_naive} memory vs naive")


def plot(records: list[common.Record], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.status == "ok"]
    modes = sorted({r.mode for r in ok}, key=["linear", "fused"].index)
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 2.2 + 0.5 * len(ok)), squeeze=False)
    for row, mode in enumerate(modes):
        rs = [r for r in ok if r.mode == mode]
        names = [r.name for r in rs]
        for col, (attr, label) in enumerate((("median_ms", "median ms (fwd+bwd)"),
                                             ("peak_extra_mb", "peak extra MB"))):
            ax = axes[row][col]
            vals = [getattr(r, attr) or 0.0 for r in rs]
            bars = ax.barh(names, vals, color=["#999999" if n == "naive" else "#3b75af" for n in names])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(f"{mode} mode: {label}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--pairs", type=int, help="preference pairs B (2B sequences)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence T")
    p.add_argument("--hidden", type=int, help="hidden size H")
    p.add_argument("--vocab", type=int, help="vocabulary size V")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype")
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="fraction of each sequence masked as prompt (not scored); default 0: every token scored")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--repeats", type=int, help="timed runs per implementation (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs per implementation first")
    p.add_argument("--modes", default="linear,fused", help="comma list of linear, fused")
    p.add_argument("--only", action="append", default=[],
                   help="run only implementations whose name contains this (repeatable; naive always runs)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if device.type not in DEFAULTS:
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    for key, val in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("linear", "fused")]
    if bad or not modes:
        p.error(f"--modes must be a comma list of linear, fused; got {args.modes!r}")
    args.modes = modes
    if not 0.0 <= args.prompt_frac < 1.0:
        p.error(f"--prompt-frac must be in [0, 1), got {args.prompt_frac}")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    n = 2 * args.pairs * args.seq_len
    print(f"device={device} dtype={args.dtype} pairs={args.pairs} T={args.seq_len} tokens={n} H={args.hidden} "
          f"V={args.vocab}", flush=True)
    rates = measure_rates(device, dtype)
    if device.type == "cuda" and dtype != torch.float16:
        # The float16 row's roofline, at the float16 rate measured in the same run.
        rates["matmul_tflops_float16"] = measure_rates(device, torch.float16)["matmul_tflops"]
    print(f"measured: {rates}", flush=True)
    inp = make_inputs(args, device, dtype)
    records: list[common.Record] = []
    if "linear" in args.modes:
        records += run_mode("linear", linear_impls(inp, device, args.beta), device, args,
                            [inp["hidden"], inp["weight"], *(inp["half"] or ())])
    if "fused" in args.modes:
        with torch.no_grad():
            logits = (inp["hidden"] @ inp["weight"].T).requires_grad_()
        records += run_mode("fused", fused_impls(logits, inp, device, args.beta), device, args, [logits])
        del logits
    roofline = {mode: round(roofline_ms(mode, args, rates, elem), 2) for mode in args.modes}
    # Gradients of the inputs (both stay in their dtype): what any implementation must allocate.
    grads_mb = {"linear": (n + args.vocab) * args.hidden * elem / common.MB, "fused": n * args.vocab * elem / common.MB}
    for rec in records:
        if rec.median_ms:
            annotate_roofline(rec, args, rates, elem, inp, grads_mb[rec.mode])
    config = dict(pairs=args.pairs, seq_len=args.seq_len, tokens=n, hidden=args.hidden, vocab=args.vocab,
                  dtype=args.dtype, prompt_frac=args.prompt_frac, beta=args.beta, loss_type="sigmoid",
                  repeats=args.repeats, warmup=args.warmup)
    notes = [
        "median ms: forward + backward wall time, median of the repeats (implementations interleaved within each "
        "repeat); median CPU ms: the process CPU time of the same runs (CPU only: on a shared machine the wall "
        "time also counts waiting for the cores).",
        "time vs naive: ratio of the wall-time medians; the JSON also has paired_time_vs_naive (median of the "
        "per-repeat ratios) and cpu_time_vs_naive (ratio of the CPU-time medians).",
        "peak extra MB: peak allocation during one forward + backward beyond the inputs (gradients included).",
        f"roofline: linear = 6*N*H*V flops at the measured matmul rate (8*N*H*V for the rows whose schedule is "
        f"the two-pass or recompute one; the float16 row at the float16 rate), fused = 3*N*V*{elem} bytes at "
        "the measured copy bandwidth (its ratio is the share of copy bandwidth reached); the note gives median / "
        "roofline, roofline_fraction (in the JSON) its inverse.",
        "beyond the inputs' gradients: peak extra MB minus the gradients of hidden and weight (linear) or of the "
        "logits (fused), in the input dtype.",
        "naive = dpo_fast.loss.oracle with dtype=None (full logits and log_softmax in the input dtype).",
    ]
    json_path, md_path = common.write_results("loss", device, config, records,
                                              extra={"rates": rates, "roofline_ms": roofline},
                                              out_dir=args.out_dir, notes=notes)
    png_path = args.out_dir / f"loss-{device.type}.png"
    plot(records, png_path, f"DPO loss fwd+bwd, {args.dtype}, {args.pairs} pairs x {args.seq_len}, "
                            f"H={args.hidden}, V={args.vocab} ({device.type})")
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
