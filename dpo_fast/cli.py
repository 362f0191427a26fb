"""`python -m dpo_fast.cli` (as torchrun runs the command line) and the `dpo_fast.cli:main` entry point of
earlier installs: the command line itself is `dpo_fast.commands.main`."""

import sys

from .commands.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
