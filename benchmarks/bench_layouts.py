"""Padding waste and tokens per row of the three layouts, on two length profiles.

For the same pairs and the same token budget per batch, each layout is built with
`dpo_fast.layouts.group_pairs` + `build_batch` (what the trainer and `pair_logps` run), and counted:

- computed: positions the model runs (rows x row length, padding included);
- real: positions holding a token (prompt counted once per pair in prefix_shared, twice otherwise);
- padding waste: 1 - real / computed;
- tokens per row: real tokens per row;
- vs padded: computed positions relative to the padded layout (the forward's work, to first order).

Profiles (lognormal lengths, medians): "long" shared prompts, prompt:completion about 4:1 (hh-rlhf-like);
"short" prompts, about 0.4:1 (UltraFeedback-like).

    python benchmarks/bench_layouts.py [--pairs 2000] [--budget 16384] [--row 4096]

Writes benchmarks/results/layouts-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from dpo_fast.layouts import LAYOUTS, build_batch, group_pairs  # noqa: E402
from dpo_fast.pairs import ROLE_PAD, TokenizedPair  # noqa: E402

# (median prompt tokens, median completion tokens): the ratio is what matters.
PROFILES = {"long": (400, 100), "short": (120, 300)}
SIGMA = 0.6  # lognormal spread of every length
MAX_LENGTH = 2048  # prompt + completion cap, as a tokenizer's max_length would apply


def _length(rng: random.Random, median: int) -> int:
    return max(1, round(median * rng.lognormvariate(0.0, SIGMA)))


def make_pairs(profile: str, num_pairs: int, seed: int) -> list[TokenizedPair]:
    """Pairs with the profile's lengths; token ids are irrelevant to the counts, so they are all 1."""
    rng = random.Random(seed)
    prompt_median, completion_median = PROFILES[profile]
    pairs = []
    for i in range(num_pairs):
        chosen, rejected = _length(rng, completion_median), _length(rng, completion_median)
        prompt = min(_length(rng, prompt_median), MAX_LENGTH - max(chosen, rejected))
        if prompt < 1:
            chosen = rejected = MAX_LENGTH // 2
            prompt = MAX_LENGTH // 2
        pairs.append(TokenizedPair((1,) * prompt, (1,) * chosen, (1,) * rejected, index=i))
    return pairs


def measure(pairs: list[TokenizedPair], layout: str, budget: int, row: int) -> dict:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=16384, help="tokens per batch (padding included for padded)")
    parser.add_argument("--row", type=int, default=4096, help="row length of the packed layouts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    results, lines = {}, []
    for profile in PROFILES:
        pairs = make_pairs(profile, args.pairs, args.seed)
        print(f"[layouts] {profile}: {len(pairs)} pairs", flush=True)
        results[profile] = {layout: measure(pairs, layout, args.budget, args.row) for layout in LAYOUTS}
        base = results[profile]["padded"]["computed_positions"]
        for layout, r in results[profile].items():
            r["computed_vs_padded"] = r["computed_positions"] / base
            lines.append(f"| {profile} | {layout} | {r['batches']} | {r['rows']} | {r['computed_positions']} | "
                         f"{r['real_tokens']} | {100 * r['padding_waste']:.1f}% | {r['tokens_per_row']:.0f} | "
                         f"{r['computed_vs_padded']:.2f} |")

    device = torch.device("cpu")
    meta = common.metadata(device)
    config = {"pairs": args.pairs, "budget": args.budget, "row": args.row, "seed": args.seed,
              "profiles": {k: {"prompt_median": p, "completion_median": c, "sigma": SIGMA}
                           for k, (p, c) in PROFILES.items()}, "max_length": MAX_LENGTH}
    payload = {"schema": common.SCHEMA, "benchmark": "layouts", "device": "cpu", "meta": meta, "config": config,
               "results": results}
    out = common.RESULTS_DIR
    common.write_atomic(out / "layouts-cpu.json", json.dumps(payload, indent=2) + "\n")
    command = "python benchmarks/bench_layouts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Layouts: padding waste and tokens per row",
        "",
        f"{meta['date_utc']}, commit {meta['git_commit']}. Command: `{command.strip()}`",
        "",
        "Config: " + json.dumps(config),
        "",
        "| profile | layout | batches | rows | computed positions | real tokens | padding waste | tokens/row "
        "| computed vs padded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *lines,
        "",
        "- real tokens: prompt once per pair in prefix_shared (plus the one repeated last prompt token that "
        "starts the rejected branch), twice in padded and packed.",
    ]
    common.write_atomic(out / "layouts-cpu.md", "\n".join(md) + "\n")
    print("\n".join(md[6:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
