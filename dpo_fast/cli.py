"""The `dpo-fast` command: `dpo-fast train ...` and `dpo-fast demo ...`.

`train` gets one flag per `DPOConfig` field, generated from the dataclass (help from the field
metadata), in both spellings `--learning-rate` and `--learning_rate`. Values come, lowest priority first,
from the dataclass defaults, the `--config` YAML file, then the flags given. Every configuration mistake
(unknown flag, bad value, missing model path, an output dir holding another run, a loss that needs a
reference without one) stops with one argparse error (exit status 2) before any model weight is read
where possible, and always before training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence

from .config import DPOConfig, coerce_field, field_type
from .losses import REFERENCE_FREE

NO_REFERENCE = "none"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class _FieldType:
    """argparse `type=` for a DPOConfig field: coerces the text and reports errors in the field's words."""

    def __init__(self, name: str):
        self.name = name
        self.__name__ = field_type(name)  # argparse names the type in "invalid <type> value"

    def __call__(self, text: str):
        try:
            return coerce_field(self.name, text, source="--" + self.name.replace("_", "-"))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def add_config_arguments(parser: argparse.ArgumentParser, *, title: str = "training configuration (DPOConfig fields)",
                         skip: frozenset[str] = frozenset()) -> None:
    """One flag per DPOConfig field (but those in `skip`); absent flags leave no attribute (argparse.SUPPRESS)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(DPOConfig):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:
            flags.append("--" + f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if field_type(f.name) == "bool":
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(*flags, dest=f.name, type=_FieldType(f.name), default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Policy model: a local directory or a Hub name.")
    parser.add_argument("--data", required=True,
                        help="Preference data: a file (.jsonl/.json/.parquet/.csv), a folder or a Hub dataset name.")
    parser.add_argument("--data-split", default="train", help="Split of --data to train on (default: train).")
    parser.add_argument("--eval-data", default=None, help="Optional evaluation data, same forms as --data.")
    parser.add_argument("--ref-model", default=None,
                        help="Reference model (directory or Hub name); default: a frozen copy of the initial "
                             f"policy. '{NO_REFERENCE}' for no reference (reference-free losses only).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer to use; default: the one of --model.")
    parser.add_argument("--config", default=None, help="YAML file of DPOConfig fields; flags given here override it.")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to load the weights in.")
    parser.add_argument("--attn-implementation", default=None,
                        help="transformers attn_implementation (eager, sdpa, flash_attention_2, ...).")
    add_config_arguments(parser)


# Subcommands implemented in their own modules, each with `add_arguments(parser)` and `run(args) -> int`.
# They are imported only when asked for, so `dpo-fast train` never pays for them (nor they for it).
LAZY_COMMANDS = {
    "demo": ("dpo_fast.demo", "A self-contained demonstration on a synthetic task (offline, CPU, minutes)."),
    "score": ("dpo_fast.commands.score", "Score every pair of a dataset with a DPO model's implicit reward."),
    "rank": ("dpo_fast.commands.rank", "Rank k models on preference pairs (k forward passes, k^2 comparisons)."),
    "sweep": ("dpo_fast.commands.sweep_cmd", "Short trainings over several betas, with a recommendation."),
    "synth": ("dpo_fast.commands.synth_cmd", "Sample responses, score them, and write preference pairs."),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-fast", description="Fast, memory-lean DPO training.")
    names = ["train", *LAZY_COMMANDS]
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")
    train = sub.add_parser("train", help="Train a causal LM with DPO.", description="Train a causal LM with DPO.")
    _add_train_arguments(train)
    train.set_defaults(subparser=train)
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, (module_name, help_text) in LAZY_COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:
            importlib.import_module(module_name).add_arguments(command)
    return parser


def _looks_like_local_path(name: str) -> bool:
    """Hub names are 'name' or 'org/name'; anything else with a path shape must exist on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _check_model_name(parser: argparse.ArgumentParser, flag: str, name: str) -> None:
    """A path that does not exist fails now, not after minutes of imports and a Hub lookup."""
    if os.path.exists(os.path.expanduser(name)):
        if not os.path.isdir(os.path.expanduser(name)):
            parser.error(f"{flag} {name!r} is a file; expected a model directory (with config.json) or a Hub name")
        return
    if _looks_like_local_path(name):
        parser.error(f"{flag} {name!r} does not exist (expected a local model directory or a Hub name org/model)")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DPOConfig:
    overrides = {name: getattr(args, name) for name in DPOConfig.field_names() if hasattr(args, name)}
    try:
        if args.config is not None:
            return DPOConfig.from_yaml(args.config, **overrides)
        return DPOConfig(**overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def _load_model(parser: argparse.ArgumentParser, flag: str, name: str, args: argparse.Namespace):
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if args.dtype != "auto":
        # transformers renamed torch_dtype to dtype in 4.56; an unknown keyword would be silently ignored.
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs[key] = getattr(torch, args.dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
    except (OSError, ValueError) as e:
        parser.error(f"{flag} {name!r} could not be loaded: {e}")


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .trainer import check_output_dir

    config = config_from_args(parser, args)
    ref_name = args.ref_model
    if ref_name is not None and ref_name.lower() == NO_REFERENCE:
        ref_name = None
        if config.loss_type not in REFERENCE_FREE:
            parser.error(f"--ref-model {NO_REFERENCE}: loss_type={config.loss_type!r} needs a reference model; "
                         f"use a reference-free loss ({', '.join(sorted(REFERENCE_FREE))}) or drop --ref-model")
    elif ref_name is not None and config.loss_type in REFERENCE_FREE:
        parser.error(f"--ref-model: loss_type={config.loss_type!r} is reference-free and uses no reference model")
    _check_model_name(parser, "--model", args.model)
    if ref_name is not None:
        _check_model_name(parser, "--ref-model", ref_name)
    if args.tokenizer is not None:
        _check_model_name(parser, "--tokenizer", args.tokenizer)
    for flag, value in (("--data", args.data), ("--eval-data", args.eval_data)):
        if value is not None and _looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
            parser.error(f"{flag} {value!r} does not exist")
    try:
        check_output_dir(config)
    except ValueError as e:
        parser.error(str(e))
    if config.lora_r > 0:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--lora-r > 0 needs the peft package: pip install 'dpo-fast[peft]'")

    from transformers import AutoTokenizer

    from .data import load_preferences
    from .trainer import DPOTrainer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(args.tokenizer or args.model))
    except (OSError, ValueError) as e:
        parser.error(f"--tokenizer {args.tokenizer or args.model!r} could not be loaded: {e}")
    try:
        train_data = load_preferences(os.path.expanduser(args.data), split=args.data_split)
        eval_data = None if args.eval_data is None else load_preferences(os.path.expanduser(args.eval_data))
    except (OSError, ValueError) as e:
        parser.error(f"--data: {e}")
    model = _load_model(parser, "--model", args.model, args)
    ref_model = None if ref_name is None else _load_model(parser, "--ref-model", ref_name, args)
    try:
        trainer = DPOTrainer(model, tokenizer, train_data, config=config, ref_model=ref_model, eval_data=eval_data)
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    metrics = trainer.train()
    if trainer.rank == 0:
        final = os.path.join(config.output_dir, "final")
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"done: {trainer.global_step} steps; {summary}; model saved in {final}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command in LAZY_COMMANDS:
        return int(importlib.import_module(LAZY_COMMANDS[args.command][0]).run(args) or 0)
    return _train(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
