"""The `dpo-fast` command: `dpo-fast train ...` and `dpo-fast demo ...`.

`train` gets one flag per `DPOConfig` field, generated from the dataclass (help from the field
metadata), in both spellings `--learning-rate` and `--learning_rate`. Values come, lowest priority first,
from the dataclass defaults, the `--config` YAML file, then the flags given. Every configuration mistake
(unknown flag, bad value, missing model path, an output dir holding another run or not writable, a
checkpoint to resume that is missing or invalid, a loss that needs a reference without one) stops with
one error line and a pointer to --help (exit status 2), never a traceback, before any model weight is
read where possible. Messages raised in DPOConfig's words name the flags (`--resume-from-checkpoint`).
The data summary is printed before training.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
import warnings
from collections.abc import Sequence

from .commands.sources import CommandError, check_data_path, error_text, resolve_model_source
from .loss.formulas import LOSS_TYPES, REFERENCE_FREE
from .training.config import DPOConfig, coerce_field, field_type

NO_REFERENCE = "none"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Fields whose help lists their values here (the others list them in their own help text).
FIELD_CHOICES = {"loss_type": LOSS_TYPES}
_QUOTE = "'"
_FIELDS_LONGEST_FIRST = sorted(DPOConfig.field_names(), key=len, reverse=True)
# field=value (a quoted string or a bare token), and a bare field name with an underscore (unambiguous:
# "beta" or "seed" are also English words). Not inside a flag already (--max-length) nor a longer word.
_ASSIGNMENT = re.compile(r"(?<![\w-])(" + "|".join(_FIELDS_LONGEST_FIRST) + r")=('[^']*'|[^\s,;:)]+)")
_FIELD_NAME = re.compile(r"(?<![\w-])(" + "|".join(n for n in _FIELDS_LONGEST_FIRST if "_" in n) + r")(?![\w=])")


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


class CommandParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one error line and a pointer to --help instead of the usage block."""

    def error(self, message: str):
        self.exit(2, error_text(self.prog, flag_spelling(message)))


def flag_spelling(message: str) -> str:
    """A DPOConfig message in the command line's words: `resume_from_checkpoint='latest'` becomes
    `--resume-from-checkpoint latest`, `overwrite_output_dir=True` `--overwrite-output-dir`, and a field
    name with an underscore its flag. Flags already written as flags stay as they are."""

    def assignment(m: re.Match) -> str:
        flag, value = "--" + m.group(1).replace("_", "-"), m.group(2)
        if value == "True":
            return flag
        if value == "False":
            return "--no-" + flag[2:]
        return f"{flag} {value[1:-1] if value.startswith(_QUOTE) else value}"

    message = _ASSIGNMENT.sub(assignment, message)
    return _FIELD_NAME.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


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
        help_text = f.metadata.get("help", "")
        if f.name in FIELD_CHOICES:
            help_text += f" Choices: {', '.join(FIELD_CHOICES[f.name])}."
        help_text += f" (default: {f.default!r})"
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
    parser.add_argument("--strict", action="store_true",
                        help="Stop at the first malformed row of --data/--eval-data instead of skipping it "
                             "(skipped rows are listed in the data summary).")
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
    "demo": ("dpo_fast.demo.run", "A self-contained demonstration on a synthetic task (offline, CPU, minutes)."),
    "score": ("dpo_fast.commands.score", "Score every pair of a dataset with a DPO model's implicit reward."),
    "rank": ("dpo_fast.commands.rank", "Rank k models on preference pairs (k forward passes, k^2 comparisons)."),
    "sweep": ("dpo_fast.commands.sweep_cmd", "Short trainings over several betas, with a recommendation."),
    "synth": ("dpo_fast.commands.synth_cmd", "Sample responses, score them, and write preference pairs."),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = CommandParser(prog="dpo-fast", description="Fast, memory-lean DPO training.")
    names = ["train", *LAZY_COMMANDS]
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")
    train = sub.add_parser("train", help="Train a causal LM with DPO.", description="Train a causal LM with DPO.")
    _add_train_arguments(train)
    train.set_defaults(subparser=train)
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, (module_name, help_text) in LAZY_COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(subparser=command)
        if argv[:1] == [name]:
            importlib.import_module(module_name).add_arguments(command)
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DPOConfig:
    overrides = {name: getattr(args, name) for name in DPOConfig.field_names() if hasattr(args, name)}
    try:
        if args.config is not None:
            return DPOConfig.from_yaml(args.config, **overrides)
        return DPOConfig(**overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def _load_model(flag: str, name: str, args: argparse.Namespace):
    import torch
    import transformers
    from packaging.version import Version

    from .commands.sources import load_causal_lm

    kwargs = {}
    if args.dtype != "auto":
        # transformers renamed torch_dtype to dtype in 4.56; an unknown keyword would be silently ignored.
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs[key] = getattr(torch, args.dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    return load_causal_lm(flag, name, **kwargs)


def _check_before_loading(parser: argparse.ArgumentParser, args: argparse.Namespace, config: DPOConfig) -> str | None:
    """Every check that needs no model weights, in the order a user would fix them; returns the reference
    model's name (None: no reference model)."""
    from .training import checkpoint as ckpt
    from .training.trainer import check_output_dir

    ref_name = args.ref_model
    if ref_name is not None and ref_name.lower() == NO_REFERENCE:
        ref_name = None
        if config.loss_type not in REFERENCE_FREE:
            parser.error(f"--ref-model {NO_REFERENCE}: loss_type={config.loss_type!r} needs a reference model; "
                         f"use a reference-free loss ({', '.join(sorted(REFERENCE_FREE))}) or drop --ref-model")
    elif ref_name is not None and config.loss_type in REFERENCE_FREE:
        parser.error(f"--ref-model: loss_type={config.loss_type!r} is reference-free and uses no reference model")
    try:
        resolve_model_source("--model", args.model)
        if ref_name is not None:
            resolve_model_source("--ref-model", ref_name)
        if args.tokenizer is not None:
            resolve_model_source("--tokenizer", args.tokenizer, probe_file="tokenizer_config.json")
        check_data_path("--data", args.data)
        if args.eval_data is not None:
            check_data_path("--eval-data", args.eval_data)
        check_output_dir(config)
        ckpt.check_writable_dir(config.output_dir)
        if config.resume_from_checkpoint:
            # Resolved (and validated) once here, so that a missing or invalid checkpoint fails before loading.
            config.resume_from_checkpoint = ckpt.resolve_resume_path(
                config.resume_from_checkpoint, config.output_dir,
                warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    except (CommandError, ValueError, OSError) as e:
        parser.error(str(e))
    if config.lora_r > 0:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--lora-r > 0 needs the peft package: pip install 'dpo-fast[peft]'")
    return ref_name


def _load_pairs(flag: str, name: str, args: argparse.Namespace, tokenizer, config: DPOConfig, split: str):
    """Rows of --data/--eval-data, tokenized as the trainer would, with the data summary."""
    from .data.formats import load_preferences_with_report
    from .data.summary import summarize_data
    from .data.tokenization import tokenize_dataset

    try:
        dataset, report = load_preferences_with_report(os.path.expanduser(name), split=split, strict=args.strict)
        pairs, stats = tokenize_dataset(tokenizer, dataset, max_length=config.max_length,
                                        truncation=config.truncation)
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(f"{flag}: {e}") from None
    # The layout's padding share depends on the trainer's row capacity: the trainer reports it (`padding_line`).
    return pairs, summarize_data(pairs, stats, max_length=config.max_length, load_report=report)


def _refuse_another_run(config: DPOConfig, train_pairs) -> None:
    """Before any weight is read: CheckpointError when the checkpoint to resume was written by a run with other
    settings or data (the trainer compares again, and warns about the settings it accepts)."""
    from .training import checkpoint as ckpt
    from .training.trainer import pairs_fingerprint

    path = config.resume_from_checkpoint
    current = ckpt.run_settings(config, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                                num_train_pairs=len(train_pairs), data_fingerprint=pairs_fingerprint(train_pairs))
    current["layout"] = None  # the trainer may change it (flash attention -> padded): it compares the one in use
    ckpt.check_resume(path, ckpt.read_trainer_state(path), current)


def _done_line(trainer, config: DPOConfig, metrics: dict) -> str:
    """The last line of a run: which loss is which, every other metric, where the model went."""
    step = trainer.global_step
    first = ((step - 1) // config.logging_steps) * config.logging_steps + 1
    window = f"steps {first}-{step}" if first < step else f"step {step}"
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4g} (mean over {window})")
    if isinstance(metrics.get("last_step_loss"), float):
        parts.append(f"last step's loss {metrics['last_step_loss']:.4g}")
    parts += [f"{k}={v:.4g}" for k, v in metrics.items()
              if isinstance(v, float) and k not in ("loss", "last_step_loss")]
    final = os.path.join(config.output_dir, "final")
    if not parts:
        parts = ["no step left to run"]
    return f"done: {step} steps; {'; '.join(parts)}; model and tokenizer saved in {final}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: `warning: <message>`, without the library's file and line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # restores showwarning afterwards
        warnings.showwarning = _one_line_warning
        return _run_training(parser, args)


def _run_training(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .training import checkpoint as ckpt
    from .training.metrics import TrainingDiverged

    config = config_from_args(parser, args)
    ref_name = _check_before_loading(parser, args, config)

    from .commands.sources import load_tokenizer
    from .training.trainer import DistributedTimeout, DPOTrainer

    try:
        tokenizer = load_tokenizer("--tokenizer" if args.tokenizer else "--model", args.tokenizer or args.model)
        train_pairs, summary = _load_pairs("--data", args.data, args, tokenizer, config, args.data_split)
        print(summary.format(), file=sys.stderr)
        eval_pairs = None
        if args.eval_data is not None:
            eval_pairs, _ = _load_pairs("--eval-data", args.eval_data, args, tokenizer, config, "train")
        if config.resume_from_checkpoint:
            _refuse_another_run(config, train_pairs)
        model = _load_model("--model", args.model, args)
        ref_model = None if ref_name is None else _load_model("--ref-model", ref_name, args)
    except (CommandError, ckpt.CheckpointError) as e:
        parser.error(str(e))
    try:
        trainer = DPOTrainer(model, tokenizer, train_pairs, config=config, ref_model=ref_model, eval_data=eval_pairs)
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    try:
        metrics = trainer.train()
    except ckpt.CheckpointError as e:  # a resume refused: this run's settings differ from the checkpoint's
        parser.error(str(e))
    except (ckpt.CheckpointWriteError, TrainingDiverged, DistributedTimeout) as e:
        print(error_text(parser.prog, str(e)).splitlines()[0], file=sys.stderr)
        return 1
    except ckpt.TrainingInterrupted as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 128 + e.signum
    if trainer.rank == 0:
        # The run's divergence warnings (a list in the returned metrics) are repeated at the end.
        for warning in metrics.get("warnings") or []:
            print(f"warning: {warning}", file=sys.stderr)
        print(_done_line(trainer, config, metrics))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so that the message names it: `dpo-fast train: error`
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in LAZY_COMMANDS:
        return int(importlib.import_module(LAZY_COMMANDS[args.command][0]).run(args) or 0)
    return _train(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
