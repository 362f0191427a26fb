"""`dpo-fast sweep`: short DPO runs over several betas from the same weights, compared on held-out pairs.

Prints a table (held-out reward accuracy, margin, KL to the reference, chosen log-prob drift), writes
sweep.json and sweep.png into --output-dir, and recommends the beta with the best held-out reward accuracy
whose KL is within --kl-budget. `--demo` runs it on the demo's sorting task and SFT model, offline.
Training flags are the `DPOConfig` fields of `dpo-fast train` (beta and output_dir excepted).
"""

from __future__ import annotations

import argparse
import os
import random
import sys

from ..evaluation.sweep import KL_SAMPLES
from ..training.config import DPOConfig, coerce_field
from .flags import add_config_arguments, flag_spelling
from .sources import CommandError, error_text, load_causal_lm, load_tokenizer, resolve_model_source

# DPOConfig fields the sweep sets itself: one beta per run, one output directory per run.
_SWEEP_FIELDS = ("beta", "output_dir")
DEFAULT_OUTPUT_DIR = os.path.join("runs", "sweep")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beta", required=True, help="Comma-separated betas to compare, e.g. 0.01,0.05,0.1,0.3,1.0.")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Where each run (beta_<beta>/), sweep.json and sweep.png go (default: "
                             f"{DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--kl-budget", type=float, default=None,
                        help="Recommend only betas whose held-out KL(policy || reference) is at most this.")
    parser.add_argument("--kl-samples", default="sampled", choices=KL_SAMPLES,
                        help="Completions the KL is measured on: sampled from the policy at temperature 1 "
                             "(default; a Monte Carlo estimate of the KL) or greedy.")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="Longest completion generated for the KL estimate (default 64; with --demo the "
                             "demo's 12).")
    parser.add_argument("--processes", action="store_true",
                        help="Run each beta in its own Python process, from the initial weights saved once.")
    parser.add_argument("--demo", action="store_true",
                        help="The demo's sorting task and SFT model (no --model/--data needed).")
    parser.add_argument("--quick", action="store_true", help="With --demo: a very small setting (seconds; tests).")
    parser.add_argument("--sft-steps", type=int, default=None, help="With --demo: SFT steps (default: the demo's).")
    parser.add_argument("--model", default=None, help="Initial policy (and reference): a directory or Hub name.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer; default: the one of --model.")
    parser.add_argument("--data", default=None, help="Training preference data (anything load_preferences reads).")
    parser.add_argument("--eval-data", default=None,
                        help="Held-out preference data; default: --eval-fraction of --data, held out (seeded).")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="Share of --data held out when --eval-data is not given (default 0.1).")
    parser.add_argument("--config", default=None, help="YAML file of DPOConfig fields; flags given here override it.")
    add_config_arguments(parser, title="training configuration of every run (DPOConfig fields)",
                         skip=frozenset(_SWEEP_FIELDS))


class _Usage(ValueError):
    """A mistake in the command line: reported in one line, exit status 2."""


def _overrides(args: argparse.Namespace) -> dict:
    values = {}
    if args.config is not None:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise _Usage(f"--config {args.config!r} cannot be read: {e}") from None
        if not isinstance(values, dict):
            raise _Usage(f"--config {args.config!r} must hold a mapping of DPOConfig fields")
        for name in _SWEEP_FIELDS:
            values.pop(name, None)
        unknown = sorted(set(values) - set(DPOConfig.field_names()))
        if unknown:
            raise _Usage(f"--config {args.config!r}: unknown DPOConfig field(s) {', '.join(map(str, unknown))}")
        # YAML reads 5e-7 as a string: each value is brought to its field's type, as `dpo-fast train` does.
        values = {name: coerce_field(name, value, source=f"--config {args.config!r}") for name, value in values.items()}
    values.update({n: getattr(args, n) for n in DPOConfig.field_names() if n not in _SWEEP_FIELDS and hasattr(args, n)})
    return values


def _demo_inputs(args, overrides):
    from ..demo.run import QUICK, DemoSettings
    from ..demo.setup import demo_config, demo_setup

    values = dict(QUICK) if args.quick else {}
    if args.sft_steps is not None:
        values["sft_steps"] = args.sft_steps
    settings = DemoSettings(**values)
    setup = demo_setup(settings)
    config = demo_config(settings, setup.train_pairs, args.output_dir, **overrides)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else settings.max_new_tokens
    return setup.model, setup.tokenizer, setup.train_pairs, setup.eval_pairs, config, max_new


def _file_inputs(args, overrides):
    from ..data.formats import load_preferences
    from ..data.tokenization import tokenize_dataset

    if args.model is None or args.data is None:
        raise _Usage("--model and --data are needed (or --demo)")
    if args.eval_data is None and not 0 < args.eval_fraction < 1:
        raise _Usage(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    try:
        config = DPOConfig(**{"output_dir": args.output_dir, **overrides})
    except ValueError as e:
        raise _Usage(str(e)) from None
    resolve_model_source("--model", args.model)
    tokenizer = load_tokenizer("--tokenizer" if args.tokenizer else "--model", args.tokenizer or args.model)
    try:
        train_pairs, _ = tokenize_dataset(tokenizer, load_preferences(os.path.expanduser(args.data)),
                                          max_length=config.max_length, truncation=config.truncation)
        if args.eval_data is not None:
            eval_pairs, _ = tokenize_dataset(tokenizer, load_preferences(os.path.expanduser(args.eval_data)),
                                             max_length=config.max_length, truncation=config.truncation)
        else:
            order = list(range(len(train_pairs)))
            random.Random(config.seed).shuffle(order)
            held = max(1, round(args.eval_fraction * len(order)))
            if held >= len(order):
                raise _Usage(f"--data has {len(order)} pairs: too few to hold out {args.eval_fraction:.0%} and "
                             "train on the rest; give --eval-data")
            eval_pairs = [train_pairs[i] for i in sorted(order[:held])]
            train_pairs = [train_pairs[i] for i in sorted(order[held:])]
    except (OSError, ValueError) as e:
        raise _Usage(f"--data/--eval-data: {e}") from None
    model = load_causal_lm("--model", args.model)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else 64
    return model, tokenizer, train_pairs, eval_pairs, config, max_new


def run(args: argparse.Namespace) -> int:
    """Run `dpo-fast sweep`; returns the exit status (2 for a mistake in the command line)."""
    from ..evaluation.sweep import format_table, parse_betas, run_sweep, write_outputs

    try:
        betas = parse_betas(args.beta)
        if args.kl_budget is not None and not args.kl_budget >= 0:
            raise _Usage(f"--kl-budget must be >= 0, got {args.kl_budget}")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise _Usage(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.demo and (args.model or args.data or args.eval_data):
            raise _Usage("--demo brings its own model and data: drop --model/--data/--eval-data")
        overrides = _overrides(args)
        inputs = _demo_inputs(args, overrides) if args.demo else _file_inputs(args, overrides)
        model, tokenizer, train_pairs, eval_pairs, config, max_new = inputs
        report = run_sweep(model, tokenizer, train_pairs, eval_pairs, betas, base_config=config,
                           output_dir=args.output_dir, kl_budget=args.kl_budget, kl_samples=args.kl_samples,
                           max_new_tokens=max_new, processes=args.processes)
    except (ValueError, CommandError) as e:
        print(error_text("dpo-fast sweep", flag_spelling(str(e))), end="", file=sys.stderr)
        return 2
    print(format_table(report))
    results_path, chart_path = write_outputs(report, args.output_dir)
    print(f"wrote {results_path}" + (f" and {chart_path}" if chart_path else " (no chart: matplotlib missing)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-fast sweep", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
