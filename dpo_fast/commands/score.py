"""`dpo-fast score`: the implicit DPO reward of one model on every pair of a preference set.

Writes one JSON line per pair (index, chosen_reward, rejected_reward, margin, correct) with --output,
atomically and only once everything is scored, and prints the reward accuracy (Wilson interval) and the
mean margin (percentile bootstrap interval). Also holds the loading helpers `dpo-fast rank` shares.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .sources import (
    CommandError,
    ModelSource,
    check_data_path,
    error_text,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)

__all__ = ["CommandError", "add_arguments", "add_common_arguments", "check_common_arguments", "check_data_path",
           "check_model_path", "fail", "load_data", "load_model", "load_tokenizer", "run"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
LAYOUTS = ("prefix_shared", "packed", "padded")

DESCRIPTION = (
    "Score a preference set with a model's implicit DPO reward beta * (log pi(y|x) - log pi_ref(y|x)): "
    "per-pair chosen/rejected rewards and margins, reward accuracy with its Wilson interval, mean margin "
    "with a bootstrap interval. One forward pass over the data per model (policy, then reference)."
)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags `score` and `rank` share: data, tokenizer, loading and scoring options."""
    parser.add_argument("--data", required=True,
                        help="Preference data: a file (.jsonl/.json/.parquet/.csv), a folder or a Hub "
                             "dataset name.")
    parser.add_argument("--data-split", default="train", help="Split of --data to score (default: train).")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer to use; default: the one of the first --model.")
    parser.add_argument("--beta", type=float, default=0.1,
                        help="Scale of the implicit reward (default: 0.1).")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="Longest prompt + response in tokens; longer pairs are truncated "
                             "(default: 1024).")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None,
                        help="Token budget of one forward pass (default: 8 * max-length).")
    parser.add_argument("--layout", default="prefix_shared", choices=LAYOUTS,
                        help="Batch layout (default: prefix_shared; flash attention needs packed).")
    parser.add_argument("--n-bootstrap", type=int, default=1000,
                        help="Bootstrap resamples of the pairs for the intervals (default: 1000).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resamples (default: 0).")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to load the weights in.")
    parser.add_argument("--attn-implementation", default=None,
                        help="transformers attn_implementation (eager, sdpa, flex_attention, ...).")
    parser.add_argument("--device", default=None,
                        help="Device to score on (default: cuda if available, else cpu).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if not parser.description:
        parser.description = DESCRIPTION
    parser.add_argument("--model", required=True, help="Policy model: a local directory or a Hub name.")
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument("--ref-model", default=None,
                           help="Reference model: a local directory or a Hub name.")
    reference.add_argument("--reference-free", action="store_true",
                           help="No reference model: the reward is beta * log pi(y|x).")
    parser.add_argument("--output", default=None,
                        help="Per-pair scores to write (.jsonl: index, chosen_reward, rejected_reward, "
                             "margin, correct); written atomically once every pair is scored.")
    add_common_arguments(parser)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers (also used by `rank`)
# ---------------------------------------------------------------------------------------------------------


def check_model_path(flag: str, name: str) -> ModelSource:
    """A model value checked before anything is loaded (`resolve_model_source`)."""
    return resolve_model_source(flag, name)


def check_common_arguments(args: argparse.Namespace) -> None:
    import math

    if not (math.isfinite(args.beta) and args.beta > 0):
        raise CommandError(f"--beta must be a positive number, got {args.beta}")
    if args.max_length < 2:
        raise CommandError(f"--max-length must be >= 2, got {args.max_length}")
    if args.n_bootstrap < 1:
        raise CommandError(f"--n-bootstrap must be >= 1, got {args.n_bootstrap}")
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch < 1:
        raise CommandError(f"--max-tokens-per-batch must be >= 1, got {args.max_tokens_per_batch}")
    check_data_path("--data", args.data)
    if args.tokenizer is not None:
        resolve_model_source("--tokenizer", args.tokenizer, probe_file="tokenizer_config.json")


def config_vocab_size(flag: str, name: str) -> int | None:
    """config.vocab_size read from the model's config alone (no weights), to fail before loading them."""
    from transformers import AutoConfig

    source = resolve_model_source(flag, name)
    try:
        config = AutoConfig.from_pretrained(source.path, local_files_only=source.local_files_only)
    except (OSError, ValueError) as e:
        raise CommandError(f"{flag} {name!r}: cannot read its config: {e}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def check_vocab_sizes(named: list[tuple[str, str]]) -> None:
    """(flag, name) of every model: their config.vocab_size must agree."""
    sizes = [(flag, name, config_vocab_size(flag, name)) for flag, name in named]
    flag0, name0, size0 = sizes[0]
    for flag, name, size in sizes[1:]:
        if size != size0:
            raise CommandError(f"{flag} {name!r} has config.vocab_size={size} but {flag0} {name0!r} has "
                               f"{size0}: they do not share a tokenizer, so their log-probs cannot be "
                               "compared")


def check_tokenizer_matches(tokenizer, tokenizer_name: str, flag: str, name: str) -> None:
    """When the model directory has a tokenizer of its own, it must have the same vocabulary."""
    from transformers import AutoTokenizer

    source = resolve_model_source(flag, name)
    try:
        own = AutoTokenizer.from_pretrained(source.path, local_files_only=source.local_files_only)
    except (OSError, ValueError, TypeError):
        return  # no tokenizer files there: config.vocab_size and the lm_head are checked instead
    if own.get_vocab() != tokenizer.get_vocab():
        raise CommandError(f"{flag} {name!r} has a tokenizer with another vocabulary ({len(own)} tokens) "
                           f"than {tokenizer_name!r} ({len(tokenizer)} tokens): the models do not share a "
                           "tokenizer")


def load_data(args: argparse.Namespace):
    from ..data.formats import load_preferences

    try:
        return load_preferences(os.path.expanduser(args.data), split=args.data_split)
    except (OSError, ValueError) as e:
        raise CommandError(f"--data {args.data!r}: {e}") from None


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(flag: str, name: str, args: argparse.Namespace, device: str):
    import torch

    kwargs: dict[str, Any] = {}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = load_causal_lm(flag, name, **kwargs)
    model.to(device)
    model.eval()
    return model


def fail(command: str, message: str) -> int:
    print(error_text(f"dpo-fast {command}", message), end="", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`dpo-fast score`; returns the exit status (2 for a usage or input error, with nothing written)."""
    try:
        return _score(args)
    except (CommandError, ValueError, TypeError) as e:
        return fail("score", str(e))


def _score(args: argparse.Namespace) -> int:
    from ..evaluation.rewards import score_pairs, write_scores

    ref_name = None if args.reference_free else args.ref_model
    check_common_arguments(args)
    check_model_path("--model", args.model)
    if ref_name is not None:
        check_model_path("--ref-model", ref_name)
    if args.output is not None and os.path.isdir(os.path.expanduser(args.output)):
        raise CommandError(f"--output {args.output!r} is a directory; expected a .jsonl file path")
    tokenizer_name = args.tokenizer or args.model
    tokenizer = load_tokenizer("--tokenizer" if args.tokenizer else "--model", tokenizer_name)
    data = load_data(args)
    if ref_name is not None:
        check_vocab_sizes([("--model", args.model), ("--ref-model", ref_name)])
        check_tokenizer_matches(tokenizer, tokenizer_name, "--ref-model", ref_name)

    device = resolve_device(args.device)
    model = load_model("--model", args.model, args, device)
    ref_model = None if ref_name is None else load_model("--ref-model", ref_name, args, device)
    try:
        result = score_pairs(model, ref_model, tokenizer, data, beta=args.beta, max_length=args.max_length,
                             layout=args.layout, max_tokens_per_batch=args.max_tokens_per_batch,
                             n_bootstrap=args.n_bootstrap, seed=args.seed)
    except ValueError as e:
        names = f"--model {args.model!r}" + ("" if ref_name is None else f", --ref-model {ref_name!r}")
        raise CommandError(f"{e} ({names})") from None
    print(result.summary())
    if args.output is not None:
        write_scores(result, os.path.expanduser(args.output))
        print(f"wrote {result.num_pairs} rows to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_fast.commands.score", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
