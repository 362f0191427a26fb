"""What the batch layouts cost before and around the model: padding, host time, activation memory.

Three tables, each from what the trainer runs (`dpo_fast.data.layouts.build_batch`, `dpo_fast.data.attention`):

1. Padding per layout and attention form at the end-to-end benchmark's profiles (`benchmarks/e2e_data.py`,
   the GPU lengths: long prompts ~1024 + 2 x 256, short ~256 + 2 x 640 tokens), micro-batches of 4 pairs
   as `bench_e2e.py` trains them. Forms: "flex" = one row per micro-batch padded to FlexAttention's
   128-token tile (the CUDA default for packed/prefix_shared); "varlen" = one row, no padding (flash);
   "dense" = rows of 2 x max_length (eager/sdpa, whose mask costs R x L^2). padded: 2B rows.
2. Host milliseconds per micro-batch to build the inputs, median over the micro-batches, on this CPU:
   the layout (`build_batch`), the FlexAttention BlockMask (`flex_block_mask`; on CUDA these ops run on
   the device and the host only launches them, so the CPU time is an upper bound), the dense mask as the
   trainer now builds it (`attention_mask_4d` from the per-key bounds) and as it did before (the literal
   all-pairs rule, `allowed_pairs`, the 158-358 ms per step measured on the H200 host).
3. Activation bytes per real token: what the backbone's forward leaves alive for its backward (the live
   total of the profiler's allocation events when the forward returns), with gradient checkpointing off
   and on, for the CPU Llama preset of `bench_e2e.py` at the long profile's CPU lengths.
4. (kept from before) Padding waste of token-budget batches over many pairs (`group_pairs`, lognormal
   lengths, 16384-token batches, 4096-token rows).

    python benchmarks/bench_layouts.py

Writes benchmarks/results/layouts-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import e2e_data  # noqa: E402

from dpo_fast.data.attention import FLEX_BLOCK_SIZE, allowed_pairs, attention_mask_4d, flex_block_mask
from dpo_fast.data.layouts import LAYOUTS, build_batch, group_pairs  # noqa: E402
from dpo_fast.data.pairs import ROLE_PAD, TokenizedPair  # noqa: E402

PAIRS_PER_STEP = 4  # bench_e2e.py's --batch-size
GPU_LENGTH_SCALE = 4.0  # bench_e2e.py's LENGTH_SCALE["cuda"]
# (median prompt tokens, median completion tokens) of the token-budget table: the ratio is what matters.
BUDGET_PROFILES = {"long": (400, 100), "short": (120, 300)}
SIGMA = 0.6  # lognormal spread of every length in the token-budget table
MAX_LENGTH = 2048  # prompt + completion cap there, as a tokenizer's max_length would apply


def e2e_pairs(profile: str, num_pairs: int, scale: float, seed: int) -> list[TokenizedPair]:
    base = e2e_data.PROFILES[profile]
    scaled = dataclasses.replace(base, prompt_tokens=round(base.prompt_tokens * scale),
                                 completion_tokens=round(base.completion_tokens * scale))
    return e2e_data.make_pairs(e2e_data.make_tokenizer(4096), scaled, num_pairs, seed=seed)


def _rows(layout: str, form: str, max_length: int) -> dict:
    """build_batch's row arguments for an attention form (what the trainer passes)."""
    if layout == "padded":
        return {"max_tokens_per_row": None}
    if form == "dense":
        return {"max_tokens_per_row": 2 * max_length}
    return {"max_tokens_per_row": None, "pad_to_multiple_of": FLEX_BLOCK_SIZE if form == "flex" else 1}


def steps_of(pairs: list[TokenizedPair]) -> list[list[TokenizedPair]]:
    return [pairs[s:s + PAIRS_PER_STEP] for s in range(0, len(pairs) - PAIRS_PER_STEP + 1, PAIRS_PER_STEP)]


def padding(pairs: list[TokenizedPair], layout: str, form: str, max_length: int) -> dict:
    computed = real = rows = 0
    for step in steps_of(pairs):
        batch = build_batch(step, layout, pad_id=0, **_rows(layout, form, max_length))
        computed += batch.input_ids.numel()
        real += int((batch.roles != ROLE_PAD).sum())
        rows += batch.input_ids.shape[0]
    return {"computed_positions": computed, "real_tokens": real, "rows_per_step": rows / len(steps_of(pairs)),
            "padding_waste": 1 - real / computed}


def _median_ms(fn, inputs) -> float:
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _all_pairs_mask(batch) -> torch.Tensor:
    """The dense mask as the trainer built it before (the literal rule, then an additive bf16 mask)."""
    allowed = allowed_pairs(batch).unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=torch.bfloat16)
    return mask.masked_fill_(~allowed, torch.finfo(torch.bfloat16).min)


def host_ms(pairs: list[TokenizedPair], max_length: int) -> dict:
    """Median host ms per micro-batch of prefix_shared (the default layout)."""
    steps = steps_of(pairs)
    flex_rows, dense_rows = _rows("prefix_shared", "flex", max_length), _rows("prefix_shared", "dense", max_length)
    flex = [build_batch(s, "prefix_shared", pad_id=0, **flex_rows) for s in steps]
    dense = [build_batch(s, "prefix_shared", pad_id=0, **dense_rows) for s in steps]
    build_batch(steps[0], "prefix_shared", pad_id=0, **flex_rows)  # warm-up
    flex_block_mask(flex[0], "cpu")
    out = {
        "layout_ms": _median_ms(lambda s: build_batch(s, "prefix_shared", pad_id=0, **flex_rows), steps),
        "block_mask_ms": _median_ms(lambda b: flex_block_mask(b, "cpu"), flex),
        "dense_mask_ms": _median_ms(lambda b: attention_mask_4d(b, torch.bfloat16), dense),
        "dense_mask_all_pairs_rule_ms": _median_ms(_all_pairs_mask, dense[:4]),
        "row_tokens": statistics.median(b.input_ids.shape[1] for b in flex),
    }
    out["flex_path_ms"] = out["layout_ms"] + out["block_mask_ms"]
    return out


def _live_bytes_after(fn) -> tuple[float, object]:
    """Bytes allocated during `fn` and still alive when it returns (profiler allocation events), and its result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocation = torch._C._profiler._EventType.Allocation
    live = 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == allocation:
            live += node.extra_fields.alloc_size
    return float(live), result


def activation_bytes(pairs: list[TokenizedPair], threads: int) -> dict:
    """Per real token, what the backbone keeps for its backward, checkpointing off and on (sdpa, prefix_shared)."""
    import bench_e2e
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_fast.data.attention import model_inputs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset = bench_e2e.MODEL_PRESETS["cpu"]
    model = LlamaForCausalLM(LlamaConfig(**preset, max_position_embeddings=4096, attn_implementation="sdpa"))
    model.train()
    batch = build_batch(pairs[:PAIRS_PER_STEP], "prefix_shared", pad_id=0)
    inputs = model_inputs(model, batch, "cpu")
    real = int((batch.roles != ROLE_PAD).sum())
    out = {"model": preset, "real_tokens": real, "row_tokens": batch.input_ids.shape[1]}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        live, hidden = _live_bytes_after(lambda: model.model(**inputs, use_cache=False).last_hidden_state)
        hidden.float().sum().backward()
        model.zero_grad(set_to_none=True)
        key = "checkpointing_on" if checkpointing else "checkpointing_off"
        out[key] = {"activation_bytes": live, "bytes_per_real_token": live / real}
    out["ratio_on_vs_off"] = out["checkpointing_on"]["activation_bytes"] / out["checkpointing_off"]["activation_bytes"]
    return out


def _lognormal(rng: random.Random, median: int) -> int:
    return max(1, round(median * rng.lognormvariate(0.0, SIGMA)))


def budget_pairs(profile: str, num_pairs: int, seed: int) -> list[TokenizedPair]:
    """Pairs with lognormal lengths; token ids are irrelevant to the counts, so they are all 1."""
    rng = random.Random(seed)
    prompt_median, completion_median = BUDGET_PROFILES[profile]
    pairs = []
    for i in range(num_pairs):
        chosen, rejected = _lognormal(rng, completion_median), _lognormal(rng, completion_median)
        prompt = min(_lognormal(rng, prompt_median), MAX_LENGTH - max(chosen, rejected))
        if prompt < 1:
            chosen = rejected = prompt = MAX_LENGTH // 2
        pairs.append(TokenizedPair((1,) * prompt, (1,) * chosen, (1,) * rejected, index=i))
    return pairs


def budget_padding(pairs: list[TokenizedPair], layout: str, budget: int, row: int) -> dict:
    computed = real = rows = 0
    batches = group_pairs(pairs, layout, max_tokens_per_batch=budget)
    for members in batches:
        batch = build_batch([pairs[i] for i in members], layout, pad_id=0,
                            max_tokens_per_row=None if layout == "padded" else row)
        computed += batch.input_ids.numel()
        real += int((batch.roles != ROLE_PAD).sum())
        rows += batch.input_ids.shape[0]
    return {"batches": len(batches), "rows": rows, "computed_positions": computed, "real_tokens": real,
            "padding_waste": 1 - real / computed, "tokens_per_row": real / rows}


FORMS = {"padded": ("dense", "varlen"), "packed": ("flex", "varlen", "dense"), "prefix_shared": ("flex", "dense")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e-pairs", type=int, default=96, help="pairs per profile for tables 1-2")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per profile for table 4")
    parser.add_argument("--budget", type=int, default=16384, help="table 4: tokens per batch")
    parser.add_argument("--row", type=int, default=4096, help="table 4: row length of the packed layouts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2-core machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict = {"padding": {}, "host_ms": {}, "budget_padding": {}}
    lines_pad, lines_host, lines_budget = [], [], []
    for profile in e2e_data.PROFILES:
        print(f"[layouts] e2e profile {profile}: {args.e2e_pairs} pairs", flush=True)
        pairs = e2e_pairs(profile, args.e2e_pairs, GPU_LENGTH_SCALE, args.seed)
        max_length = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
        results["padding"][profile] = {}
        for layout, forms in FORMS.items():
            for form in forms:
                r = padding(pairs, layout, form, max_length)
                results["padding"][profile][f"{layout}/{form}"] = r
                lines_pad.append(f"| {profile} | {layout} | {form} | {r['rows_per_step']:.1f} | "
                                 f"{r['computed_positions'] / len(steps_of(pairs)):.0f} | "
                                 f"{100 * r['padding_waste']:.1f}% |")
        h = host_ms(pairs, max_length)
        results["host_ms"][profile] = h
        lines_host.append(f"| {profile} | {h['row_tokens']:.0f} | {h['layout_ms']:.2f} | {h['block_mask_ms']:.2f} | "
                          f"**{h['flex_path_ms']:.2f}** | {h['dense_mask_ms']:.1f} | "
                          f"{h['dense_mask_all_pairs_rule_ms']:.1f} |")
    print("[layouts] activation bytes, checkpointing off/on", flush=True)
    act = activation_bytes(e2e_pairs("long", PAIRS_PER_STEP, 1.0, args.seed), args.threads)
    results["activations"] = act
    for profile in BUDGET_PROFILES:
        pairs = budget_pairs(profile, args.pairs, args.seed)
        print(f"[layouts] token budgets, {profile}: {len(pairs)} pairs", flush=True)
        results["budget_padding"][profile] = {
            layout: budget_padding(pairs, layout, args.budget, args.row) for layout in LAYOUTS}
        base = results["budget_padding"][profile]["padded"]["computed_positions"]
        for layout, r in results["budget_padding"][profile].items():
            r["computed_vs_padded"] = r["computed_positions"] / base
            lines_budget.append(f"| {profile} | {layout} | {r['batches']} | {r['rows']} | {r['computed_positions']} | "
                                f"{r['real_tokens']} | {100 * r['padding_waste']:.1f}% | {r['tokens_per_row']:.0f} | "
                                f"{r['computed_vs_padded']:.2f} |")

    meta = common.metadata(torch.device("cpu"))
    config = {"e2e_pairs": args.e2e_pairs, "pairs_per_step": PAIRS_PER_STEP, "gpu_length_scale": GPU_LENGTH_SCALE,
              "flex_block_size": FLEX_BLOCK_SIZE, "threads": args.threads, "seed": args.seed,
              "budget_table": {"pairs": args.pairs, "budget": args.budget, "row": args.row, "max_length": MAX_LENGTH,
                               "profiles": {k: {"prompt_median": p, "completion_median": c, "sigma": SIGMA}
                                            for k, (p, c) in BUDGET_PROFILES.items()}}}
    payload = {"schema": common.SCHEMA, "benchmark": "layouts", "device": "cpu", "meta": meta, "config": config,
               "results": results}
    out = common.RESULTS_DIR
    common.write_atomic(out / "layouts-cpu.json", json.dumps(payload, indent=2) + "\n")
    command = "python benchmarks/bench_layouts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    off, on = act["checkpointing_off"], act["checkpointing_on"]
    md = [
        "# Layouts: padding, host time to build the inputs, activation memory",
        "",
        f"{meta['date_utc']}, commit {meta['git_commit']}, {meta['cpu']}, torch {meta['torch']}, "
        f"{args.threads} thread(s). Command: `{command.strip()}`",
        "",
        f"## 1. Padding at the e2e profiles (GPU lengths, {PAIRS_PER_STEP} pairs per micro-batch, "
        f"{args.e2e_pairs} pairs)",
        "",
        "| profile | layout | attention form | rows per step | positions per step | padding |",
        "|---|---|---|---:|---:|---:|",
        *lines_pad,
        "",
        "flex: one row per micro-batch padded to the 128-token tile (CUDA default for packed/prefix_shared); "
        "varlen: one row, flash boundaries; dense: rows of 2 x max_length (eager/sdpa).",
        "",
        "## 2. Host ms per micro-batch to build the inputs (prefix_shared, median)",
        "",
        "| profile | flex row tokens | layout | BlockMask | flex path total | dense mask (per-key bounds) "
        "| dense mask (all-pairs rule, before) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *lines_host,
        "",
        "The BlockMask and dense masks are timed on this CPU; on CUDA they are built on the device and the host "
        "only launches the ops.",
        "",
        "## 3. Activation bytes per real token (backbone forward, kept for the backward)",
        "",
        f"CPU Llama preset of bench_e2e ({act['model']}), prefix_shared, {act['real_tokens']} real tokens in a "
        f"{act['row_tokens']}-token row, sdpa:",
        "",
        "| gradient checkpointing | activation MB | bytes per real token |",
        "|---|---:|---:|",
        f"| off | {off['activation_bytes'] / common.MB:.1f} | {off['bytes_per_real_token']:.0f} |",
        f"| on | {on['activation_bytes'] / common.MB:.1f} | {on['bytes_per_real_token']:.0f} |",
        "",
        f"Checkpointing keeps {act['ratio_on_vs_off']:.3f}x of the activations.",
        "",
        "## 4. Token-budget batches over many pairs (group_pairs; lognormal lengths)",
        "",
        "Config: " + json.dumps(config["budget_table"]),
        "",
        "| profile | layout | batches | rows | computed positions | real tokens | padding waste | tokens/row "
        "| computed vs padded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *lines_budget,
        "",
        "- real tokens: prompt once per pair in prefix_shared (plus the one repeated last prompt token that "
        "starts the rejected branch), twice in padded and packed.",
    ]
    common.write_atomic(out / "layouts-cpu.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
