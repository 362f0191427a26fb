"""`dpo-fast train`: DPO training of a causal LM from the command line.

`train` gets one flag per `DPOConfig` field (`flags.add_config_arguments`). Values come, lowest priority
first, from the dataclass defaults, the `--config` YAML file, then the flags given. Every configuration mistake
(unknown flag, bad value, missing model path, an output dir holding another run or not writable, a
checkpoint to resume that is missing or invalid, a loss that needs a reference without one) stops with
one error line and a pointer to --help (exit status 2), never a traceback, before any model weight is
read where possible. The data summary is printed before training.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..loss.formulas import REFERENCE_FREE
from ..training.config import DPOConfig
from .flags import add_config_arguments
from .sources import CommandError, check_data_path, error_text, resolve_model_source

NO_REFERENCE = "none"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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

    from .sources import load_causal_lm

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
    from ..training import checkpoint as ckpt
    from ..training.trainer import check_output_dir

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
    from ..data.formats import load_preferences_with_report
    from ..data.summary import summarize_data
    from ..data.tokenization import tokenize_dataset

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
    from ..data.pairs import pairs_fingerprint
    from ..training import checkpoint as ckpt

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


def run(args: argparse.Namespace) -> int:
    parser = args.subparser
    with warnings.catch_warnings():  # restores showwarning afterwards
        warnings.showwarning = _one_line_warning
        return _run_training(parser, args)


def _run_training(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ..training import checkpoint as ckpt
    from ..training.metrics import TrainingDiverged

    config = config_from_args(parser, args)
    ref_name = _check_before_loading(parser, args, config)

    from ..training.trainer import DistributedTimeout, DPOTrainer
    from .sources import load_tokenizer

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

