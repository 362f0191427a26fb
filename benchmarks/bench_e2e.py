"""End-to-end DPO training benchmark: TRL against dpo_fast, same model, data, maths and steps.

Contenders (the JSON keys):

- ``trl``: trl.DPOTrainer as shipped (padded batches, its chunked fused lm_head, a reference model).
- ``trl+liger``: the same with ``use_liger_kernel=True`` (Liger-Kernel's layer kernels: what TRL users pick
  for memory); skipped, with the reason, where liger_kernel is not installed or there is no GPU.
- ``trl+dpo_fast``: `dpo_fast.integrations.trl.DPOTrainer`, TRL's loop with dpo_fast computing the loss.
- ``dpo_fast``: `dpo_fast.DPOTrainer`, prefix-shared packed batches (FlexAttention on CUDA) and the fused
  linear DPO loss.
- ``dpo_fast+precomputed_ref``: the same with `precompute_ref=True` (the reference log-probs computed once
  before the first step, the reference model freed); the precompute time is reported separately.

Every contender starts from the same saved weights (a random-init Llama config), trains on the same
pre-tokenized pairs, in the same order, `--steps` optimizer steps of `--batch-size` pairs each, with
sigmoid DPO (beta 0.1), AdamW at a constant learning rate without warmup (5e-6: the first H200 run at 1e-4
sent the random 1.24B model to losses of 14 by step 4), gradient clipping at 1.0, no dropout, fp32 on the
CPU and bf16 on CUDA, no truncation (max_length is the longest pair), and the same gradient checkpointing
(on, non-reentrant, as TRL's default; `--no-gradient-checkpointing` for the other table, whose files end
in "-no-ckpt"). TRL receives the very token
ids dpo_fast does: its text tokenization (`_prepare_dataset`) is skipped and its sampler is sequential
over the pairs laid out in dpo_fast's seeded epoch order. The first steps' losses of all contenders must
agree (same maths, so the speed comparison is fair); the check is in the results.

Measured per contender: pairs/s and tokens/s (real tokens: prompt once + both completions) over steps
3..N, with the median and mean step time (steps 1 and 2 are untimed: they carry the one-off setup,
reference copy or precompute, optimizer state, dataloader, and on CUDA the FlexAttention compilations, one
per row length until torch marks the length dynamic), the loss of every step, and peak memory: on CUDA
`max_memory_allocated` over trainer construction and training; on the CPU
`benchmarks.common.peak_extra_bytes` (the profiler's allocator events) over construction and
`--memory-steps` steps of a second, untimed run. Each contender runs in its own process so that neither
memory nor patched model classes leak from one to the next.

On the CPU each contender runs on one torch thread unless --threads says otherwise: the development machine
has 2 cores shared with other jobs, and with 2 threads a descheduled worker thread stalls every op, which
made the same contender 2-7x slower from one run to the next; on one thread wall time tracks CPU time.
Process CPU seconds are reported beside the wall clock (pairs/CPU-s) for the same reason.

`--length-search` (CUDA) finds, per contender, the longest pair (prompt 3/4, completion 1/4 of its tokens,
both completions alike) that trains 2 steps at one pair per step under `--memory-cap-gb` (24 by default,
`torch.cuda.set_per_process_memory_fraction`): doubling from `--search-start` to the first failure, then
bisecting to `--search-resolution` of the length. One process per contender tries the lengths in turn
(an out-of-memory error is an answer, freed before the next try) and stops at `--search-budget-s`.

    python benchmarks/bench_e2e.py --profile long --steps 12
    python benchmarks/bench_e2e.py --profile long --device cuda --length-search   # 1B Llama, bf16

Writes benchmarks/results/e2e-<profile>.json/.md/.png (e2e-<profile>-cuda.* on CUDA, "-no-ckpt" appended
without checkpointing; the length search alone, `--search-only`, writes e2e-search-cuda.*).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import e2e_data  # noqa: E402

SCHEMA = "dpo_fast.bench.e2e/1"
CONTENDERS = ("trl", "trl+liger", "trl+dpo_fast", "dpo_fast", "dpo_fast+precomputed_ref")
UNTIMED_STEPS = 2
BASELINE = "trl"
LOSS_RTOL = 1e-3
AGREEMENT_STEPS = 3

# Llama-architecture models by device: small enough to train on 2 CPU cores; ~1.2B parameters on a GPU
# (Llama-3.2-1B's shapes, whose 128k vocabulary is where a fused loss matters most).
MODEL_PRESETS = {
    "cpu": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=4096,
        tie_word_embeddings=False,
    ),
    "cuda": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
# Pair lengths are the profile's times this factor (a GPU trains on longer sequences).
LENGTH_SCALE = {"cpu": 1.0, "cuda": 4.0}
TOKENIZER_VOCAB = 4096


@dataclasses.dataclass
class Settings:
    """Everything a worker process needs, written to JSON by the parent."""

    contender: str
    device: str
    steps: int
    batch_size: int
    learning_rate: float
    beta: float
    seed: int
    max_length: int
    threads: int
    memory_steps: int
    model_dir: str
    tokenizer_dir: str
    pairs_path: str
    work_dir: str
    order: list[int]
    bf16: bool
    gradient_checkpointing: bool = True
    memory_cap_gb: float = 0.0  # CUDA: set_per_process_memory_fraction to this many GB; 0 = the whole device
    search: dict[str, Any] | None = None  # length search mode: start, max, resolution, budget_s, profile


# ------------------------------------------------------------------------------------------------
# Worker side: one contender, one process


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_pairs(path: str) -> list:
    from dpo_fast.data.pairs import TokenizedPair

    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [TokenizedPair(tuple(p), tuple(c), tuple(r), index=i) for i, (p, c, r) in enumerate(rows)]


def _load_model(s: Settings):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if s.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(s.device)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _same_training(s, steps: int) -> dict:
    """The settings both trainers get under the same names: steps, batch, optimizer, clipping, seed, beta."""
    return dict(
        max_steps=steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        seed=s.seed,
        beta=s.beta,
        max_length=s.max_length,
        gradient_checkpointing=s.gradient_checkpointing,
    )


def _trl_trainer(
    s: Settings, model, tokenizer, pairs, steps: int, out_dir: str, step_ends: list[tuple[float, float]]
):
    import datasets
    import trl
    from transformers import TrainerCallback

    if s.contender in ("trl", "trl+liger"):
        base = trl.DPOTrainer
    else:
        from dpo_fast.integrations.trl import DPOTrainer as base

    class PreTokenized(base):
        # The pairs are already token ids (the same ones dpo_fast gets); TRL's text tokenization is skipped.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(s.device)
            step_ends.append((time.perf_counter(), time.process_time()))
            _log(f"  [{s.contender}] step {state.global_step}/{steps}")

    ordered = [pairs[i] for i in s.order]
    dataset = datasets.Dataset.from_dict(
        {
            "prompt_ids": [list(p.prompt_ids) for p in ordered],
            "chosen_ids": [list(p.chosen_ids) for p in ordered],
            "rejected_ids": [list(p.rejected_ids) for p in ordered],
        }
    )
    args = trl.DPOConfig(
        output_dir=out_dir,
        **_same_training(s, steps),
        warmup_steps=0,
        loss_type=["sigmoid"],
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=s.bf16,
        use_cpu=not s.device.startswith("cuda"),
        dataloader_num_workers=0,
        precompute_ref_log_probs=False,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=s.contender == "trl+liger",
    )
    # ref_model=None: TRL loads its reference from the policy's checkpoint directory, as it does for users.
    return PreTokenized(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
    )


def _dpo_fast_trainer(
    s: Settings,
    model,
    tokenizer,
    pairs,
    steps: int,
    out_dir: str,
    step_ends: list[tuple[float, float]],
    timings: dict[str, float],
):
    from dpo_fast.training.config import DPOConfig
    from dpo_fast.training.trainer import DPOTrainer

    config = DPOConfig(
        output_dir=out_dir,
        overwrite_output_dir=True,
        **_same_training(s, steps),
        warmup_ratio=0.0,
        loss_type="sigmoid",
        layout="prefix_shared",
        precompute_ref=s.contender == "dpo_fast+precomputed_ref",
        logging_steps=1,
        save_steps=0,
        report_to_tensorboard=False,
        bf16=s.bf16,
        backend="auto",
    )
    trainer = DPOTrainer(model, tokenizer, pairs, config=config)
    plan = [i for micro in trainer.epoch_plan(0) for i in micro]
    if plan[: len(s.order)] != s.order or any(len(m) != s.batch_size for m in trainer.epoch_plan(0)[:steps]):
        raise RuntimeError(
            "dpo_fast's epoch order differs from the one the benchmark gave TRL: the contenders "
            "would not train on the same pairs per step"
        )

    step = trainer.optimizer_step

    def timed_step() -> float:
        grad_norm = step()
        _synchronize(s.device)
        step_ends.append((time.perf_counter(), time.process_time()))
        _log(f"  [{s.contender}] step {len(step_ends)}/{steps}")
        return grad_norm

    trainer.optimizer_step = timed_step
    setup_reference = getattr(trainer, "_setup_reference", None)
    if setup_reference is not None:  # reports the reference setup (copy or precompute) on its own

        def timed_setup() -> None:
            start = time.perf_counter()
            setup_reference()
            _synchronize(s.device)
            timings["reference_setup_s"] = time.perf_counter() - start

        trainer._setup_reference = timed_setup
    return trainer


def _history(s: Settings, trainer) -> list[dict[str, Any]]:
    """One record per optimizer step with loss, logps/chosen, logps/rejected."""
    if s.contender.startswith("trl"):
        records = [r for r in trainer.state.log_history if "loss" in r and "step" in r]
    else:
        records = list(trainer.metrics.history)
    return [
        {
            "step": int(r["step"]),
            "loss": float(r["loss"]),
            "logps/chosen": float(r["logps/chosen"]),
            "logps/rejected": float(r["logps/rejected"]),
        }
        for r in records
    ]


def _train(s: Settings, steps: int, tag: str) -> dict[str, Any]:
    """Builds the contender's trainer on a fresh copy of the initial weights and trains `steps` steps."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(s.tokenizer_dir)
    pairs = _load_pairs(s.pairs_path)
    model = _load_model(s)
    out_dir = os.path.join(s.work_dir, f"{s.contender.replace('+', '_')}-{tag}")
    step_ends: list[tuple[float, float]] = []  # (wall clock, process CPU time) at the end of each step
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if s.contender.startswith("trl"):
        trainer = _trl_trainer(s, model, tokenizer, pairs, steps, out_dir, step_ends)
    else:
        trainer = _dpo_fast_trainer(s, model, tokenizer, pairs, steps, out_dir, step_ends, timings)
    _synchronize(s.device)
    train_start = time.perf_counter()
    trainer.train()
    _synchronize(s.device)
    end = time.perf_counter()
    if len(step_ends) != steps:
        raise RuntimeError(f"{s.contender}: timed {len(step_ends)} optimizer steps, expected {steps}")
    history = _history(s, trainer)
    if [r["step"] for r in history] != list(range(1, steps + 1)):
        raise RuntimeError(f"{s.contender}: logged steps {[r['step'] for r in history]}, expected 1..{steps}")
    del trainer, model
    wall, cpu = [w for w, _ in step_ends], [c for _, c in step_ends]
    first = min(UNTIMED_STEPS, steps) - 1  # the end of the last untimed step starts the clock
    return {
        "construct_s": train_start - start,
        "train_s": end - train_start,
        "first_step_s": wall[0] - train_start,
        "untimed_steps_s": wall[first] - train_start,
        "step_s": [b - a for a, b in zip(wall[first:], wall[first + 1:])],
        "steady_s": wall[-1] - wall[first],
        "steady_cpu_s": cpu[-1] - cpu[first],
        "history": history,
        **timings,
    }


def _import_up_front(contender: str) -> None:
    """Imports done before any clock starts: module loading is process start-up, not training (a few seconds
    on this CPU, which would otherwise land in step 1 or in the reference precompute)."""
    import importlib

    names = [
        "transformers",
        "matplotlib.pyplot",
        "dpo_fast.loss.functional",
        "dpo_fast.loss.ops.torch_logps",
        "dpo_fast.loss.ops.torch_one_pass",
    ]
    names += (
        ["trl", "datasets"]
        if contender.startswith("trl")
        else ["dpo_fast.training.trainer", "dpo_fast.training.scoring", "dpo_fast.data.tokenization"]
    )
    if contender == "trl+dpo_fast":
        names.append("dpo_fast.integrations.trl")
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _cap_memory(s: Settings) -> None:
    if s.memory_cap_gb and s.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, s.memory_cap_gb * 1024**3 / total))


def _out_of_memory(error: BaseException) -> bool:
    # Compiled kernels (FlexAttention, Triton) report it as a RuntimeError naming the failure.
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def search_longest(fits, start: int, maximum: int, resolution: float, deadline: float) -> dict[str, Any]:
    """The longest length that `fits(length) -> dict(status=...)` accepts: doubling from `start` to the first
    failure (or past `maximum`), then bisecting until the bracket is narrower than `resolution` x the
    longest fitting length, or time.monotonic() passes `deadline`. A failure other than "oom" ends the
    search (it is no memory answer). Returns the tries, the longest fit, the first failure above it."""
    tries: list[dict[str, Any]] = []
    best = failure = None

    def attempt(length: int) -> bool:
        nonlocal best, failure
        outcome = {"pair_tokens": length, **fits(length)}
        tries.append(outcome)
        if outcome["status"] == "ok":
            best = outcome
            return True
        failure = outcome
        return False

    length = start
    while length <= maximum and time.monotonic() < deadline and attempt(length):
        length *= 2
    stopped = failure is not None and failure["status"] != "oom"
    while (best is not None and failure is not None and not stopped and time.monotonic() < deadline
           and failure["pair_tokens"] - best["pair_tokens"] > resolution * best["pair_tokens"]):
        middle = (best["pair_tokens"] + failure["pair_tokens"]) // 2
        stopped = not attempt(middle) and failure["status"] != "oom"
    if stopped or (failure is not None and best is None):  # no memory answer, or the first length fails
        complete = True
    elif failure is None:  # doubled past the maximum, unless the time ran out first
        complete = best is not None and 2 * best["pair_tokens"] > maximum
    else:
        complete = failure["pair_tokens"] - best["pair_tokens"] <= resolution * best["pair_tokens"]
    return {"longest_fitting": best, "first_failure": failure, "tries": tries, "complete": complete,
            "resolution": resolution}


def run_search_worker(s: Settings, out_path: str) -> None:
    """The length search of one contender, in this process; results rewritten after every try."""
    from transformers import PreTrainedTokenizerFast

    search = s.search
    tokenizer = PreTrainedTokenizerFast.from_pretrained(s.tokenizer_dir)
    result: dict[str, Any] = {"contender": s.contender, "memory_cap_gb": s.memory_cap_gb}

    def fits(length: int) -> dict[str, Any]:
        pairs = e2e_data.make_pairs(tokenizer, e2e_data.search_profile(length), 2, seed=s.seed)
        path = Path(s.work_dir) / f"search-{s.contender.replace('+', '_')}-{length}.json"
        path.write_text(json.dumps([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs]))
        longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
        trial = dataclasses.replace(s, pairs_path=str(path), order=[0, 1], max_length=longest, batch_size=1,
                                    steps=2, search=None)
        _log(f"  [{s.contender}] length search: pairs of {length} tokens")
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            with _peak_counter_kept():
                _train(trial, 2, f"search-{length}")
            return {"status": "ok", "peak_memory_mb": (torch.cuda.max_memory_allocated() - base) / common.MB}
        except Exception as e:  # an answer for the search, not a crash; freed before the next try
            return {"status": "oom" if _out_of_memory(e) else "error",
                    "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    def fits_and_record(length: int) -> dict[str, Any]:
        outcome = fits(length)
        tries.append({"pair_tokens": length, **outcome})
        common._write_atomic(Path(out_path), json.dumps({**result, "status": "partial", "tries": tries}) + "\n")
        return outcome

    tries: list[dict[str, Any]] = []
    found = search_longest(fits_and_record, search["start"], search["max"], search["resolution"],
                           time.monotonic() + search["budget_s"])
    result.update(status="ok", search=found)
    common._write_atomic(Path(out_path), json.dumps(result) + "\n")


def run_worker(settings_path: str, out_path: str) -> None:
    with open(settings_path, encoding="utf-8") as f:
        s = Settings(**json.load(f))
    torch.set_num_threads(s.threads)
    _import_up_front(s.contender)
    _cap_memory(s)
    if s.device.startswith("cuda") and s.contender.startswith("dpo_fast"):
        # Its rows change length every step: compiled FlexAttention would compile for the first length and
        # again, dynamic, for the second. Dynamic from the start is the same steady state with one compile.
        torch._dynamo.config.assume_static_by_default = False
    if s.search is not None:
        run_search_worker(s, out_path)
        return
    result: dict[str, Any] = {"contender": s.contender}
    cuda = s.device.startswith("cuda")
    rss_before = _rss_mb()
    with _peak_counter_kept() if cuda else contextlib.nullcontext():
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        try:
            timed = _train(s, s.steps, "timed")
        except torch.OutOfMemoryError as e:  # an answer, not a crash
            result.update(status="oom", reason=str(e).splitlines()[0][:300])
            common._write_atomic(Path(out_path), json.dumps(result) + "\n")
            return
        if cuda:
            result["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / common.MB
            result["peak_memory_method"] = "torch.cuda.max_memory_allocated (construction + training)"
    result["rss_high_water_delta_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    result.update(timed)
    if not cuda and not s.memory_steps:
        result["peak_memory_mb"] = result["rss_high_water_delta_mb"]
        result["peak_memory_method"] = "RSS high-water delta (ru_maxrss) of the timed run"
    if not cuda and s.memory_steps:
        _log(f"  [{s.contender}] memory run: {s.memory_steps} steps under the profiler")
        peak, method = common.peak_extra_bytes(
            lambda: _train(s, s.memory_steps, "memory"), torch.device("cpu")
        )
        result["peak_memory_mb"] = peak / common.MB
        result["peak_memory_method"] = f"{method} (construction + {s.memory_steps} steps, separate run)"
    common._write_atomic(Path(out_path), json.dumps(result) + "\n")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / common.MB


@contextlib.contextmanager
def _peak_counter_kept():
    """dpo_fast's train() resets CUDA's peak counter after its reference setup; keep the counter running so
    the peak covers construction, reference setup and training for every contender alike."""
    original = torch.cuda.reset_peak_memory_stats
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.reset_peak_memory_stats = original


# ------------------------------------------------------------------------------------------------
# Parent side: data, initial weights, one process per contender, summary


def _epoch_order(num_pairs: int, seed: int) -> list[int]:
    # dpo_fast.DPOTrainer's epoch-0 order (a seeded permutation); the worker checks it against the trainer.
    from dpo_fast.training.plan import epoch_order

    return epoch_order(num_pairs, seed, 0)


def _prepare_data(
    args: argparse.Namespace, profile: e2e_data.Profile, work: Path, num_pairs: int
) -> dict[str, Any]:
    """Saves the tokenizer and `num_pairs` pairs of the profile under `work`."""
    tokenizer = e2e_data.make_tokenizer(min(TOKENIZER_VOCAB, args.vocab_size))
    if len(tokenizer) > args.vocab_size:
        raise ValueError(
            f"--vocab-size {args.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    tokenizer.save_pretrained(work / "tokenizer")
    pairs = e2e_data.make_pairs(tokenizer, profile, num_pairs, seed=args.seed)
    with open(work / "pairs.json", "w", encoding="utf-8") as f:
        json.dump([[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs], f)
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return {
        "tokenizer": tokenizer,
        "pairs": pairs,
        "longest_pair": longest,
        "real_tokens": [e2e_data.real_tokens(p) for p in pairs],
    }


def _prepare_model(args: argparse.Namespace, tokenizer, work: Path, max_positions: int) -> dict[str, Any]:
    """Random-initialises the preset's Llama once and saves it: every contender loads these very weights.

    With --weights-cache DIR the weights are kept there, keyed by configuration, seed and dtype, so that a
    second run (gpu_check's length search after its throughput table) skips the initialisation (tens of
    seconds for the 1.24B model on the host)."""
    import hashlib

    from transformers import LlamaConfig, LlamaForCausalLM

    preset = dict(MODEL_PRESETS["cuda" if args.device == "cuda" else "cpu"])
    overrides = (
        ("hidden_size", args.hidden_size),
        ("num_hidden_layers", args.layers),
        ("vocab_size", args.vocab_size),
    )
    preset.update({k: v for k, v in overrides if v})
    if args.hidden_size:
        preset["intermediate_size"] = int(args.hidden_size * 8 / 3) // 8 * 8
        preset["num_attention_heads"] = preset["num_key_value_heads"] = max(1, args.hidden_size // 64)
    config = LlamaConfig(
        **preset,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # bf16: half the bytes to write and read
    model_dir = work / "model"
    if args.weights_cache:
        key = json.dumps({"config": config.to_dict(), "seed": args.seed, "dtype": str(dtype)}, sort_keys=True)
        model_dir = Path(args.weights_cache) / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config).to(dtype)
        staging = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
        model.save_pretrained(staging)
        os.replace(staging, model_dir)  # complete or absent: a cut run leaves no half-written cache entry
        del model
    with torch.device("meta"):
        num_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {"model_config": preset, "num_params": num_params, "model_dir": str(model_dir)}


def _run_contender(args: argparse.Namespace, settings: Settings, work: Path) -> dict[str, Any]:
    settings_path = work / f"settings-{settings.contender.replace('+', '_')}.json"
    out_path = work / f"result-{settings.contender.replace('+', '_')}.json"
    settings_path.write_text(json.dumps(dataclasses.asdict(settings)))
    if args.inline:
        run_worker(str(settings_path), str(out_path))
    else:
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(settings_path), str(out_path)], env=env
        )
        if proc.returncode != 0:
            return {
                "contender": settings.contender,
                "status": "error",
                "reason": f"worker exited with status {proc.returncode} (its log is above)",
            }
    result = json.loads(out_path.read_text())
    result.setdefault("status", "ok")
    return result


def _summarize(result: dict[str, Any], order: list[int], real_tokens: list[int], batch: int) -> None:
    """pairs/s, tokens/s, median and mean step time over steps 3..N (the steady state), from the step end times."""
    if result["status"] != "ok":
        return
    steps = len(result["history"])
    result["losses"] = [r["loss"] for r in result["history"]]
    timed = steps - UNTIMED_STEPS
    if timed < 1 or result["steady_s"] <= 0:
        result["pairs_per_s"] = result["tokens_per_s"] = None
        return
    tokens = sum(real_tokens[i] for i in order[UNTIMED_STEPS * batch : steps * batch])
    result["pairs_per_s"] = timed * batch / result["steady_s"]
    result["tokens_per_s"] = tokens / result["steady_s"]
    result["median_step_s"] = statistics.median(result["step_s"])
    result["mean_step_s"] = statistics.fmean(result["step_s"])
    # Process CPU seconds (all threads): less sensitive than the wall clock to other jobs on a shared machine.
    result["pairs_per_cpu_s"] = timed * batch / result["steady_cpu_s"]


def _agreement(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Relative differences to TRL of the first steps' losses and of step 1's mean log-probs."""
    base = results.get(BASELINE)
    out: dict[str, Any] = {"baseline": BASELINE, "rtol": LOSS_RTOL, "steps_checked": 0, "contenders": {}}
    if base is None or base["status"] != "ok":
        out["ok"] = None
        return out
    k = min(AGREEMENT_STEPS, len(base["history"]))
    out["steps_checked"] = k
    ok = True
    for name, r in results.items():
        if name == BASELINE or r["status"] != "ok":
            continue
        diffs = {}
        for key in ("loss", "logps/chosen", "logps/rejected"):
            steps = range(k) if key == "loss" else range(1)
            diffs[key] = max(
                abs(r["history"][i][key] - base["history"][i][key]) / max(abs(base["history"][i][key]), 1e-12)
                for i in steps
            )
        out["contenders"][name] = diffs
        ok = ok and all(v <= LOSS_RTOL for v in diffs.values())
    out["ok"] = ok
    return out


def _markdown(payload: dict[str, Any]) -> str:
    meta, cfg = payload["meta"], payload["settings"]
    lines = [
        f"# End-to-end DPO training, profile `{cfg['profile']}` ({payload['device']})",
        "",
        f"{meta['date_utc']}, commit {meta['git_commit']}, {meta.get('gpu', meta['cpu'])}, "
        f"torch {meta['torch']}, "
        f"{cfg['threads']} torch thread(s) per contender, {meta['cpu_count']} CPUs, "
        f"load average before/after: {payload['loadavg_before']} / "
        f"{payload['loadavg_after']}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Model: Llama {cfg['model_config']} ({cfg['num_params'] / 1e6:.1f}M parameters), "
        f"{'bf16' if cfg['bf16'] else 'fp32'}. Data: {cfg['num_pairs']} pairs, mean prompt "
        f"{cfg['mean_prompt_tokens']:.0f} / completion {cfg['mean_completion_tokens']:.0f} tokens, "
        "longest pair "
        f"{cfg['max_length']}. {cfg['steps']} steps x {cfg['batch_size']} pairs, lr {cfg['learning_rate']}, "
        f"beta {cfg['beta']}, sigmoid loss. **Gradient checkpointing "
        f"{'on' if cfg.get('gradient_checkpointing', False) else 'off'} for every contender.**",
        "",
        "| contender | pairs/s | tokens/s | vs trl | pairs/CPU-s | vs trl (CPU) | median step s | mean step s "
        "| steps 1-2 s "
        "| peak MB | RSS high-water delta MB | precompute s | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = payload["contenders"].get(BASELINE, {}).get("pairs_per_s")
    base_cpu = payload["contenders"].get(BASELINE, {}).get("pairs_per_cpu_s")
    for name, r in payload["contenders"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r.get('reason', '')} ||||||||||||")
            continue
        speedup = r["pairs_per_s"] / base if base and r["pairs_per_s"] else None
        speedup_cpu = r.get("pairs_per_cpu_s") / base_cpu if base_cpu and r.get("pairs_per_cpu_s") else None
        precompute = r.get("reference_setup_s") if name == "dpo_fast+precomputed_ref" else None
        lines.append(
            f"| {name} | {common._fmt(r['pairs_per_s'], 2)} | {common._fmt(r['tokens_per_s'], 0)} | "
            f"{common._fmt(speedup, 2)} | {common._fmt(r.get('pairs_per_cpu_s'), 2)} | "
            f"{common._fmt(speedup_cpu, 2)} | "
            f"{common._fmt(r.get('median_step_s'), 2)} | {common._fmt(r.get('mean_step_s'), 2)} | "
            f"{common._fmt(r.get('untimed_steps_s'), 2)} | {common._fmt(r.get('peak_memory_mb'), 1)} | "
            f"{common._fmt(r['rss_high_water_delta_mb'], 1)} | {common._fmt(precompute, 2)} | "
            f"{common._fmt(r['losses'][-1], 4)} |"
        )
    agree = payload["loss_agreement"]
    lines += [
        "",
        f"Loss agreement with `{BASELINE}` (relative, first {agree['steps_checked']} steps' losses and step "
        f"1's mean log-probs, tolerance {agree['rtol']}): {'OK' if agree['ok'] else 'FAILED'}",
        "",
    ]
    for name, diffs in agree["contenders"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    method = next(
        (r.get("peak_memory_method") for r in payload["contenders"].values() if r.get("peak_memory_method")),
        "-",
    )
    lines += [
        "",
        f"Peak memory: {method}. pairs/s, tokens/s and step times: steps {UNTIMED_STEPS + 1}..N (steps "
        f"1-{UNTIMED_STEPS} hold the one-off setup and, on CUDA, compilation). tokens = prompt once + both "
        "completions, no padding. The CPU is shared: see the load average.",
    ]
    return "\n".join(lines) + "\n"


def _chart(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in payload["contenders"].items() if r["status"] == "ok"}
    fig, (ax_loss, ax_speed, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.2))
    # Same maths, so the curves should lie on top of each other: distinct styles keep each one visible.
    styles = [("-", "o", 9), ("--", "s", 6), (":", "^", 5), ("-.", "x", 7)]
    for (name, r), (line, marker, size) in zip(ok.items(), styles):
        ax_loss.plot(
            range(1, len(r["losses"]) + 1),
            r["losses"],
            linestyle=line,
            marker=marker,
            markersize=size,
            fillstyle="none",
            label=name,
        )
    ax_loss.set(xlabel="optimizer step", ylabel="DPO loss", title="loss per step")
    ax_loss.legend(fontsize=8)
    names = list(ok)
    ax_speed.bar(names, [ok[n]["pairs_per_s"] or 0 for n in names], color="tab:blue")
    ax_speed.set(ylabel="pairs / s", title=f"throughput (steps {UNTIMED_STEPS + 1}..N)")
    ax_mem.bar(names, [ok[n].get("peak_memory_mb") or 0 for n in names], color="tab:orange")
    ax_mem.set(ylabel="MB", title="peak memory")
    for ax in (ax_speed, ax_mem):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"DPO end-to-end, profile {payload['settings']['profile']} ({payload['device']})")
    fig.tight_layout()
    common.save_figure(fig, path)


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _skip_reason(name: str, device: str) -> str | None:
    """Why a contender cannot run here (None: it can)."""
    if name == "trl+liger":
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed (pip install liger-kernel)"
        if device != "cuda":
            return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def _length_search(args: argparse.Namespace, work: Path, prep: dict[str, Any], write) -> dict[str, Any]:
    """Per contender, in its own process: the longest pair (prompt 3/4, completion 1/4) whose 2 steps of one
    pair fit under --memory-cap-gb (`search_longest`). Uses the benchmark's saved model; `write(found)` is
    called after each contender, so an interrupted run keeps what it found."""
    found: dict[str, Any] = {}
    for name in args.contenders:
        reason = _skip_reason(name, args.device)
        if reason is not None:
            found[name] = {"status": "skipped", "reason": reason}
            continue
        settings = _settings(args, name, {**prep, "longest_pair": args.search_start, "pairs": [None] * 2}, work,
                             steps=2)
        settings.memory_steps = 0
        settings.search = {"start": args.search_start, "max": args.search_max, "resolution": args.search_resolution,
                           "budget_s": args.search_budget_s}
        _log(f"[length search] {name}: from {args.search_start} tokens, cap {args.memory_cap_gb} GB")
        result = _run_contender(args, settings, work)
        found[name] = result
        write(found)
    return found


def _settings(
    args: argparse.Namespace,
    name: str,
    prep: dict[str, Any],
    work: Path,
    steps: int,
    model_dir: Path | None = None,
) -> Settings:
    return Settings(
        contender=name,
        device=args.device,
        steps=steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        beta=args.beta,
        seed=args.seed,
        max_length=prep["longest_pair"],
        threads=args.threads,
        memory_steps=args.memory_steps,
        model_dir=str(model_dir or prep.get("model_dir") or work / "model"),
        tokenizer_dir=str(work / "tokenizer"),
        pairs_path=str(work / "pairs.json"),
        work_dir=str(work),
        order=_epoch_order(len(prep["pairs"]), args.seed),
        bf16=args.device == "cuda",
        gradient_checkpointing=args.gradient_checkpointing,
        memory_cap_gb=args.memory_cap_gb,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every contender on one profile; writes and returns the results payload."""
    device = torch.device(args.device)
    base_profile = e2e_data.PROFILES[args.profile]
    if args.pair_tokens:
        profile = e2e_data.scaled_profile(base_profile, args.pair_tokens)
    else:
        scale = LENGTH_SCALE[device.type]
        profile = dataclasses.replace(
            base_profile,
            prompt_tokens=round(base_profile.prompt_tokens * scale),
            completion_tokens=round(base_profile.completion_tokens * scale),
        )
    num_pairs = args.steps * args.batch_size  # one epoch, no wrap-around: each step gets new pairs
    loadavg_before = _loadavg()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_e2e-") as tmp:
        work = Path(tmp)
        _log(f"[e2e] profile {args.profile}: building tokenizer, {num_pairs} pairs and the initial weights")
        prep = _prepare_data(args, profile, work, num_pairs)
        # Positions for the length search too, so that both runs share cached weights (RoPE stores none).
        positions = max(2048, 2 * prep["longest_pair"], 2 * args.search_max)
        prep.update(_prepare_model(args, prep["tokenizer"], work, positions))
        _log(
            f"[e2e] model {prep['num_params'] / 1e6:.1f}M parameters, "
            f"longest pair {prep['longest_pair']} tokens, "
            f"load average {loadavg_before}"
        )
        for name in [] if args.search_only else args.contenders:
            reason = _skip_reason(name, args.device)
            if reason is not None:
                _log(f"[e2e] {name}: skipped ({reason})")
                results[name] = {"contender": name, "status": "skipped", "reason": reason}
                continue
            _log(f"[e2e] {name}: {args.steps} steps x {args.batch_size} pairs")
            settings = _settings(args, name, prep, work, args.steps)
            result = _run_contender(args, settings, work)
            _summarize(result, settings.order, prep["real_tokens"], args.batch_size)
            results[name] = result
            if result["status"] == "ok":
                _log(
                    f"[e2e] {name}: {result['pairs_per_s']:.2f} pairs/s, "
                    f"{result['tokens_per_s']:.0f} tokens/s, "
                    f"peak {common._fmt(result.get('peak_memory_mb'))} MB, losses "
                    + " ".join(f"{v:.4f}" for v in result["losses"][:4])
                    + " ..."
                )
            # Rewritten after every contender: a run stopped by a time limit keeps the finished rows.
            payload = _write_table(args, device, prep, results, loadavg_before, chart=False)
        if args.length_search:
            search = _length_search(args, work, prep, lambda found: _write_search(args, device, prep, found))
    if args.search_only:
        return search
    payload = _write_table(args, device, prep, results, loadavg_before, chart=not args.no_chart)
    agree = payload["loss_agreement"]
    if agree["ok"] is False:
        _log(f"[e2e] WARNING: losses disagree with {BASELINE} beyond {LOSS_RTOL}: {agree['contenders']}")
    return payload


def _write_table(args: argparse.Namespace, device: torch.device, prep: dict[str, Any],
                 results: dict[str, dict[str, Any]], loadavg_before: str, *, chart: bool) -> dict[str, Any]:
    pairs = prep["pairs"]
    payload = {
        "schema": SCHEMA,
        "benchmark": "e2e",
        "device": device.type,
        "meta": common.metadata(device),
        "loadavg_before": loadavg_before,
        "loadavg_after": _loadavg(),
        "settings": {
            "profile": args.profile,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "lr_schedule": "constant, no warmup",
            "beta": args.beta,
            "loss_type": "sigmoid",
            "seed": args.seed,
            "max_length": prep["longest_pair"],
            "num_pairs": len(pairs),
            "mean_prompt_tokens": sum(len(p.prompt_ids) for p in pairs) / len(pairs),
            "mean_completion_tokens": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
            / (2 * len(pairs)),
            "model_config": prep["model_config"],
            "num_params": prep["num_params"],
            "bf16": device.type == "cuda",
            "memory_steps": args.memory_steps,
            "threads": args.threads,
            "isolation": "inline" if args.inline else "process per contender",
            "gradient_checkpointing": args.gradient_checkpointing,
            "untimed_steps": UNTIMED_STEPS,
        },
        "command": "python benchmarks/bench_e2e.py " + " ".join(args.argv),
        "contenders": results,
        "loss_agreement": _agreement(results),
    }
    out_dir = Path(args.out_dir)
    stem = f"e2e-{args.profile}" + _suffix(args, device)
    common._write_atomic(out_dir / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    common._write_atomic(out_dir / f"{stem}.md", _markdown(payload))
    if chart:
        _chart(payload, out_dir / f"{stem}.png")
    _log(f"[e2e] wrote {out_dir / stem}.json/.md" + ("/.png" if chart else ""))
    return payload


def _suffix(args: argparse.Namespace, device: torch.device) -> str:
    return ("-cuda" if device.type == "cuda" else "") + ("" if args.gradient_checkpointing else "-no-ckpt")


def _write_search(args: argparse.Namespace, device: torch.device, prep: dict[str, Any], found: dict[str, Any]):
    payload = {
        "schema": SCHEMA,
        "benchmark": "e2e-length-search",
        "device": device.type,
        "meta": common.metadata(device),
        "settings": {"memory_cap_gb": args.memory_cap_gb, "start": args.search_start, "max": args.search_max,
                     "resolution": args.search_resolution, "budget_s_per_contender": args.search_budget_s,
                     "pairs_per_step": 1, "steps": 2, "prompt_share": 0.75,
                     "gradient_checkpointing": args.gradient_checkpointing, "model_config": prep["model_config"],
                     "num_params": prep["num_params"], "bf16": device.type == "cuda"},
        "command": "python benchmarks/bench_e2e.py " + " ".join(args.argv),
        "contenders": found,
    }
    stem = "e2e-search" + _suffix(args, device)
    out_dir = Path(args.out_dir)
    common._write_atomic(out_dir / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    common._write_atomic(out_dir / f"{stem}.md", _search_markdown(payload))
    _log(f"[length search] wrote {out_dir / stem}.json/.md")


def _search_markdown(payload: dict[str, Any]) -> str:
    meta, cfg = payload["meta"], payload["settings"]
    lines = [
        f"# End-to-end DPO: longest trainable pair under {cfg['memory_cap_gb']} GB ({payload['device']})",
        "",
        f"{meta['date_utc']}, commit {meta['git_commit']}, {meta.get('gpu', meta['cpu'])}, torch {meta['torch']}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Model: Llama {cfg['model_config']} ({cfg['num_params'] / 1e6:.1f}M parameters), "
        f"{'bf16' if cfg['bf16'] else 'fp32'}; one pair per step, 2 steps, prompt 3/4 and each completion 1/4 of "
        f"the pair's tokens; gradient checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}; doubling "
        f"from {cfg['start']}, then bisecting to {cfg['resolution']} of the length, at most "
        f"{cfg['budget_s_per_contender']} s per contender.",
        "",
        "| contender | longest pair (tokens) | peak MB | first failure (tokens) | vs trl | complete |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    def longest(r):
        best = (r.get("search") or {}).get("longest_fitting")
        return best["pair_tokens"] if best else None

    base = longest(payload["contenders"].get(BASELINE, {}))
    for name, r in payload["contenders"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} |||||")
            continue
        found = r["search"]
        best, failure = found["longest_fitting"], found["first_failure"]
        fail = f"{failure['pair_tokens']} ({failure['status']})" if failure else "-"
        ratio = best["pair_tokens"] / base if best and base else None
        lines.append(f"| {name} | {best['pair_tokens'] if best else 'none'} | "
                     f"{common._fmt(best.get('peak_memory_mb')) if best else '-'} | {fail} | "
                     f"{common._fmt(ratio, 2)} | {'yes' if found['complete'] else 'no (time budget)'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(e2e_data.PROFILES), default="long")
    p.add_argument("--steps", type=int, default=12,
                   help=f"optimizer steps per contender; the first {UNTIMED_STEPS} are untimed")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--learning-rate", type=float, default=5e-6, help="(1e-4 diverged on the random 1B model)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="for every contender alike (default: on, as TRL's DPOConfig)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--contenders",
        type=lambda v: v.split(","),
        default=list(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument(
        "--pair-tokens",
        type=int,
        default=0,
        help="scale the profile to about this many tokens of prompt + one completion (same ratio)",
    )
    p.add_argument("--hidden-size", type=int, default=0, help="override the preset's hidden size")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
    p.add_argument("--vocab-size", type=int, default=0, help="override the preset's vocabulary size")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per contender; 0 = 1 on the CPU (see the docstring), torch's default on CUDA",
    )
    p.add_argument(
        "--memory-steps", type=int, default=2, help="CPU: steps of the profiled memory run; 0 = skip"
    )
    p.add_argument("--length-search", action="store_true", help="also find the longest pair that fits (CUDA)")
    p.add_argument("--search-only", action="store_true", help="the length search without the throughput table")
    p.add_argument("--memory-cap-gb", type=float, default=24.0, help="CUDA memory cap of the length search")
    p.add_argument("--search-start", type=int, default=2048)
    p.add_argument("--search-max", type=int, default=131072)
    p.add_argument("--search-resolution", type=float, default=0.125,
                   help="bisect until the bracket is this fraction of the longest fitting length")
    p.add_argument("--search-budget-s", type=float, default=300.0, help="time per contender of the search")
    p.add_argument(
        "--inline", action="store_true", help="run contenders in this process (tests; less isolation)"
    )
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--weights-cache", default="", help="keep the initial weights in this folder, reused by later runs")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps <= UNTIMED_STEPS:
        p.error(f"--steps must be > {UNTIMED_STEPS} (throughput is measured over steps {UNTIMED_STEPS + 1}..N), "
                f"got {args.steps}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        p.error(f"--contenders: unknown {', '.join(unknown)}; expected a subset of {', '.join(CONTENDERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.length_search = args.length_search or args.search_only
    if args.length_search and args.device != "cuda":
        p.error("--length-search runs under a CUDA memory cap: it needs --device cuda")
    if not args.length_search:
        args.memory_cap_gb = 0.0  # the throughput table runs on the whole device
    if not args.threads:
        args.threads = 1 if args.device == "cpu" else torch.get_num_threads()
    if not args.vocab_size:
        args.vocab_size = MODEL_PRESETS[args.device]["vocab_size"]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        if len(argv) != 3:
            raise SystemExit("usage: bench_e2e.py --worker SETTINGS_JSON RESULT_JSON")
        run_worker(argv[1], argv[2])
        return 0
    args = parse_args(argv)
    payload = run(args)
    return 0 if args.search_only or payload["loss_agreement"]["ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
