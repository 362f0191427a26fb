"""Subcommands of the `dpo-fast` command line: each module has `add_arguments(parser)` and `run(args)`."""
