"""`dpo-fast synth`: sample responses from a model, score them, pair them into a preference dataset."""

from __future__ import annotations

import argparse
import os
import sys

from ..evaluation.synth import PAIRINGS

DEMO = "demo"
ENCODINGS = ("text", "task")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"Sampling model: a causal LM directory or Hub name, or '{DEMO}' for the demo's SFT "
                             "model (trained here first, with the sorting task's BOS + characters encoding).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer to use; default: the one of --model.")
    parser.add_argument("--prompts", required=True,
                        help=f"Prompts: a .jsonl file (a 'prompt' field per row), a .txt file (one per line) or "
                             f"'{DEMO}' (the demo task's DPO training prompts).")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first LIMIT prompts.")
    parser.add_argument("--n", type=int, default=4, help="Responses sampled per prompt (default: 4).")
    parser.add_argument("--scorer", required=True,
                        help="'module:function' (f(prompt, response) -> number or bool, e.g. "
                             "dpo_fast.demo.tasks:verify), 'length', 'confidence' (mean token log-prob under --model), "
                             "'reward-model:PATH' (a sequence classifier) or 'implicit:POLICY,REF' (DPO implicit "
                             "reward).")
    parser.add_argument("--pairing", default="best_vs_worst", choices=PAIRINGS,
                        help="How scored responses become pairs (default: best_vs_worst).")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="all_pairs_above_margin: keep pairs whose scores differ by more than this (default 0).")
    parser.add_argument("--beta", type=float, default=0.1, help="Scale of the implicit: scorer's reward (default 0.1).")
    parser.add_argument("--output", required=True, help="The preference dataset to write (.jsonl).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (default 1.0).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default 1.0: off).")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Longest response in tokens (default 64).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling and of best_vs_random.")
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences per generate call (default 16).")
    parser.add_argument("--encoding", default=None, choices=ENCODINGS,
                        help="How prompts become token ids: 'text' (the tokenizer's own special tokens, as "
                             "tokenize_pair does) or 'task' (the demo task's BOS + characters, for a saved demo "
                             f"model). Default: 'task' with --model {DEMO}, else 'text'.")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help=f"With --model {DEMO}: SFT steps of the demo model (default: the demo's).")


def _fail(message: str) -> int:
    from .sources import error_text

    print(error_text("dpo-fast synth", message), end="", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> str | None:
    if args.pairing not in PAIRINGS:
        return f"--pairing {args.pairing!r} is not known; expected one of {', '.join(PAIRINGS)}"
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    if args.n < 2:
        return f"--n must be >= 2 to have responses to compare, got {args.n}"
    if not args.temperature > 0:
        return f"--temperature must be > 0, got {args.temperature}"
    if not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if not args.output.endswith(".jsonl"):
        return f"--output {args.output!r}: expected a .jsonl path"
    if os.path.isdir(args.output):
        return f"--output {args.output!r} is a directory; expected a .jsonl file path"
    return None


def _load(args: argparse.Namespace):
    from ..demo.setup import TaskCodec
    from ..evaluation.synth import TextCodec

    encoding = getattr(args, "encoding", None) or ("task" if args.model == DEMO else "text")
    codec_class = TaskCodec if encoding == "task" else TextCodec
    if args.model == DEMO:
        from ..demo.run import DemoSettings
        from ..demo.setup import demo_setup

        settings = DemoSettings() if args.sft_steps is None else DemoSettings(sft_steps=args.sft_steps)
        setup = demo_setup(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
        return setup.model, setup.tokenizer, codec_class(setup.tokenizer)
    from .sources import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("--tokenizer" if args.tokenizer else "--model", args.tokenizer or args.model)
    model = load_causal_lm("--model", args.model).eval()
    return model, tokenizer, codec_class(tokenizer)


def run(args: argparse.Namespace) -> int:
    """Run `dpo-fast synth`; returns the exit status (2 for bad input, nothing written then)."""
    from ..evaluation.synth import ScorerError, check_scorer_spec, read_prompts, synthesize, write_jsonl

    problem = _check(args)
    if problem:
        return _fail(problem)
    try:
        if args.prompts == DEMO:
            from ..demo.setup import demo_prompts

            prompts = demo_prompts(limit=args.limit)
        else:
            prompts = read_prompts(args.prompts, limit=args.limit)
        # A misspelt scorer fails here, before a model is loaded or trained.
        check_scorer_spec(args.scorer)
    except ValueError as e:
        return _fail(str(e))
    from .sources import CommandError

    try:
        model, tokenizer, codec = _load(args)
    except CommandError as e:
        return _fail(str(e))
    except (OSError, ValueError) as e:
        return _fail(f"--model {args.model!r} could not be loaded: {e}")
    try:
        result = synthesize(model, tokenizer, prompts, scorer=args.scorer, n=args.n, pairing=args.pairing,
                            margin=args.margin, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                            codec=codec, beta=args.beta, progress=True)
    except (ScorerError, ValueError) as e:
        return _fail(f"{e}; nothing written")
    print(result.report.summary())
    if result.report.ties:
        print(f"prompts with all scores equal (first): {result.report.tie_examples}")
    if not result.rows:
        return _fail(f"no usable pair ({result.report.summary()}); nothing written")
    write_jsonl(args.output, result.rows)
    print(f"wrote {len(result.rows)} pairs to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-fast synth", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
