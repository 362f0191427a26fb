"""`dpo-fast rank`: rank several models by their implicit DPO rewards on the same preference pairs.

Prints a table (reward and likelihood accuracy with Wilson intervals, as `score` does, mean margin,
Bradley-Terry strength with a bootstrap interval) and the head-to-head win-rate matrix, and writes
rank.json and rank.png into --output-dir, atomically and only once everything is computed.
"""

from __future__ import annotations

import argparse
import os
import sys

from .score import (
    CommandError,
    add_common_arguments,
    check_common_arguments,
    check_model_path,
    check_tokenizer_matches,
    check_vocab_sizes,
    fail,
    load_data,
    load_model,
    load_tokenizer,
    resolve_device,
)

DESCRIPTION = (
    "Rank k models on the same preference pairs by their implicit DPO rewards: reward accuracy, "
    "likelihood accuracy, head-to-head win rates (a model beats another on a pair when its reward margin "
    "is larger) and a Bradley-Terry ranking; Wilson intervals for the accuracies (as in `score`), "
    "bootstrap intervals for the strengths. Cost: scoring is k forward passes "
    "over the data (one per model, plus one per distinct reference model; a shared reference is scored "
    "once), while the pairwise part grows as k^2 in comparisons (k(k-1)/2 model pairs per preference pair), "
    "computed from the stored scores without further forward passes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if not parser.description:
        parser.description = DESCRIPTION
    parser.add_argument("--model", action="append", required=True,
                        help="A model to rank (directory or Hub name); repeat for each of the k models. "
                             "Scoring costs k forward passes over the data; the pairwise part grows as k^2 "
                             "in comparisons.")
    parser.add_argument("--name", action="append", default=None,
                        help="Display name of each --model, in the same order (default: the directory name).")
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument("--ref-model", default=None,
                           help="One reference model for all --model (scored once).")
    reference.add_argument("--ref-models", default=None,
                           help="Comma-separated reference models, one per --model in the same order; a "
                                "reference named twice is loaded and scored once.")
    reference.add_argument("--reference-free", action="store_true",
                           help="No reference model: rewards are beta * log pi(y|x).")
    parser.add_argument("--output-dir", required=True, help="Where rank.json and rank.png are written.")
    add_common_arguments(parser)


def _names(args: argparse.Namespace) -> list[str]:
    if args.name is not None:
        if len(args.name) != len(args.model):
            raise CommandError(f"got {len(args.name)} --name for {len(args.model)} --model; give one per "
                               "model")
        names = list(args.name)
    else:
        names = [os.path.basename(os.path.normpath(m)) or m for m in args.model]
        if len(set(names)) < len(names):
            names = list(args.model)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CommandError(f"models must be distinct: {repeated} given more than once")
    return names


def _references(args: argparse.Namespace) -> list[str | None]:
    k = len(args.model)
    if args.reference_free:
        return [None] * k
    if args.ref_model is not None:
        return [args.ref_model] * k
    refs = [r.strip() for r in args.ref_models.split(",")]
    if len(refs) != k or not all(refs):
        raise CommandError(f"--ref-models lists {len(refs)} references for {k} --model; give one per model, "
                           "comma-separated, in the same order")
    return refs


def _key(name: str) -> str:
    """Same model, same key: local paths by their real path, Hub names as written."""
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.exists(path) else name


def run(args: argparse.Namespace) -> int:
    """`dpo-fast rank`; returns the exit status (2 for a usage or input error, with nothing written)."""
    try:
        return _rank(args)
    except (CommandError, ValueError, TypeError) as e:
        return fail("rank", str(e))


def _rank(args: argparse.Namespace) -> int:
    from ..evaluation.rewards import rank_models, write_rank_outputs

    names = _names(args)
    refs = _references(args)
    check_common_arguments(args)
    for m in args.model:
        check_model_path("--model", m)
    ref_flag = "--ref-model" if args.ref_model is not None else "--ref-models"
    for r in dict.fromkeys(r for r in refs if r is not None):
        check_model_path(ref_flag, r)
    output_dir = os.path.expanduser(args.output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CommandError(f"--output-dir {args.output_dir!r} is a file; expected a directory")

    tokenizer_name = args.tokenizer or args.model[0]
    tokenizer = load_tokenizer("--tokenizer" if args.tokenizer else "--model", tokenizer_name)
    data = load_data(args)
    # Every model and reference is checked against the vocabulary of the first, before any weight is read.
    everything = [("--model", m) for m in args.model] + [(ref_flag, r) for r in dict.fromkeys(refs) if r]
    unique = list({_key(name): (flag, name) for flag, name in everything}.values())
    check_vocab_sizes(unique)
    for flag, name in unique:
        if _key(name) != _key(tokenizer_name):
            check_tokenizer_matches(tokenizer, tokenizer_name, flag, name)

    device = resolve_device(args.device)
    loaded: dict[str, object] = {}  # one object per distinct model: rank_models scores each object once

    def get(flag: str, name: str):
        key = _key(name)
        if key not in loaded:
            loaded[key] = load_model(flag, name, args, device)
        return loaded[key]

    triples = [(n, get("--model", m), None if r is None else get(ref_flag, r))
               for n, m, r in zip(names, args.model, refs)]
    result = rank_models(triples, tokenizer, data, beta=args.beta, n_bootstrap=args.n_bootstrap,
                         seed=args.seed, max_length=args.max_length, layout=args.layout,
                         max_tokens_per_batch=args.max_tokens_per_batch)
    print(result.table())
    paths = write_rank_outputs(result, output_dir)
    print(f"{result.forward_passes} forward passes over {result.num_pairs} pairs; wrote {paths['json']} and "
          f"{paths['png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_fast.commands.rank", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
