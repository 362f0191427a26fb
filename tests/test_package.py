"""The package surface: public names, import without side effects, install metadata."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_pair_logps_is_exported_at_the_top_level():
    import dpo_fast
    from dpo_fast import pair_logps
    from dpo_fast.training.scoring import pair_logps as scoring_pair_logps

    assert pair_logps is scoring_pair_logps
    assert "pair_logps" in dpo_fast.__all__ and "pair_logps" in dir(dpo_fast)


def test_import_has_no_side_effects():
    code = ("import sys, dpo_fast; "
            "print(sorted(m for m in ('triton', 'dpo_fast.commands.score', 'dpo_fast.demo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


def test_license_is_an_spdx_expression():
    # PEP 639: a string; the table form `{ text = ... }` is deprecated (setuptools warns at install).
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', text, re.MULTILINE)


def test_documented_import_paths_still_work():
    # The README's paths from before the package was grouped by layer; dpo_fast.data re-exports the formats API.
    from dpo_fast.data import formats, load_preferences

    assert load_preferences is formats.load_preferences
    from dpo_fast.evaluation import implicit_rewards, rewards

    assert implicit_rewards is rewards.implicit_rewards
    from dpo_fast import cli
    from dpo_fast.commands import main

    assert cli.main is main.main
    # torchrun in the README runs `-m dpo_fast.cli`.
    out = subprocess.run([sys.executable, "-m", "dpo_fast.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--learning-rate" in out.stdout, out.stderr
