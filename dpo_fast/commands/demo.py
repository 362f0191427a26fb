"""`dpo-fast demo`: the demonstration (`dpo_fast.demo.run`) from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..demo import run as demo_run
from ..demo.run import DEFAULT_OUTPUT_DIR, QUICK, DemoSettings, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Where metrics.jsonl, demo.png and summary.json go (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--seed", type=int, default=DemoSettings.seed, help="Seed of the task, model and training.")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help=f"SFT optimizer steps (default: {DemoSettings.sft_steps}).")
    parser.add_argument("--dpo-steps", type=int, default=None,
                        help=f"DPO optimizer steps (default: {DemoSettings.dpo_steps}).")
    parser.add_argument("--quick", action="store_true", help="A very small setting (seconds; for tests).")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values["seed"] = args.seed
    if args.sft_steps is not None:
        values["sft_steps"] = args.sft_steps
    if args.dpo_steps is not None:
        values["dpo_steps"] = args.dpo_steps
    return DemoSettings(**values)


def run(args: argparse.Namespace) -> int:
    """Run the demo (the `demo` subcommand); returns the process exit status."""
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"dpo-fast demo: {e}", file=sys.stderr)
        return 2
    run_demo(settings, args.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_fast.commands.demo",
                                     description=demo_run.__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
