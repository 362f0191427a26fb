"""The `dpo-fast` command: `dpo-fast train ...`, `dpo-fast demo ...` and the evaluation and data tools.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`: `train` here,
the others imported only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import train
from .flags import CommandParser

# Subcommands implemented in their own modules, each with `add_arguments(parser)` and `run(args) -> int`.
# They are imported only when asked for, so `dpo-fast train` never pays for them (nor they for it).
LAZY_COMMANDS = {
    "demo": ("dpo_fast.commands.demo", "A self-contained demonstration on a synthetic task (offline, CPU, minutes)."),
    "score": ("dpo_fast.commands.score", "Score every pair of a dataset with a DPO model's implicit reward."),
    "rank": ("dpo_fast.commands.rank", "Rank k models on preference pairs (k forward passes, k^2 comparisons)."),
    "sweep": ("dpo_fast.commands.sweep", "Short trainings over several betas, with a recommendation."),
    "synth": ("dpo_fast.commands.synth", "Sample responses, score them, and write preference pairs."),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = CommandParser(prog="dpo-fast", description="Fast, memory-lean DPO training.")
    names = ["train", *LAZY_COMMANDS]
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")
    train_parser = sub.add_parser("train", help="Train a causal LM with DPO.",
                                  description="Train a causal LM with DPO.")
    train.add_arguments(train_parser)
    train_parser.set_defaults(subparser=train_parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, (module_name, help_text) in LAZY_COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(subparser=command)
        if argv[:1] == [name]:
            importlib.import_module(module_name).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so that the message names it: `dpo-fast train: error`
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in LAZY_COMMANDS:
        return int(importlib.import_module(LAZY_COMMANDS[args.command][0]).run(args) or 0)
    return train.run(args)


if __name__ == "__main__":
    sys.exit(main())
