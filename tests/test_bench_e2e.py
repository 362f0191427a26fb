"""Smoke test of the end-to-end benchmark (benchmarks/bench_e2e.py): a micro model, 2 steps, every contender.

It checks the results schema and that all contenders do the same maths (their per-step losses and step 1's
log-probs agree), not speed: timings belong in the benchmark's own results.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_e2e  # noqa: E402
import e2e_data  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return e2e_data.make_tokenizer(320)


def test_pairs_follow_the_profile(tokenizer):
    for profile in e2e_data.PROFILES.values():
        pairs = e2e_data.make_pairs(tokenizer, profile, 24, seed=3)
        assert pairs == e2e_data.make_pairs(tokenizer, profile, 24, seed=3)  # deterministic
        assert pairs != e2e_data.make_pairs(tokenizer, profile, 24, seed=4)
        eos = tokenizer.eos_token_id
        for p in pairs:
            assert p.chosen_ids[-1] == eos and p.rejected_ids[-1] == eos
            assert eos not in p.chosen_ids[:-1] and eos not in p.rejected_ids[:-1]
            assert len(p.prompt_ids) <= profile.prompt_tokens * (1 + profile.spread) + 1
            assert (
                max(len(p.chosen_ids), len(p.rejected_ids))
                <= profile.completion_tokens * (1 + profile.spread) + 1
            )
        prompt = sum(len(p.prompt_ids) for p in pairs) / len(pairs)
        completion = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
        expected = profile.prompt_tokens / profile.completion_tokens
        assert abs(prompt / completion - expected) < 0.35 * expected, (profile.name, prompt, completion)


def test_scaled_profile_keeps_the_ratio():
    long = e2e_data.scaled_profile(e2e_data.PROFILES["long"], 1000)
    assert long.prompt_tokens + long.completion_tokens == 1000
    assert long.prompt_tokens == 800
    with pytest.raises(ValueError, match="pair_tokens"):
        e2e_data.scaled_profile(e2e_data.PROFILES["long"], 8)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "1"], "--steps"),
        (["--contenders", "trl,fast"], "--contenders"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(argv)
    assert message in capsys.readouterr().err


def test_two_step_run_writes_results_and_losses_agree(tmp_path):
    argv = [
        "--profile",
        "short",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--pair-tokens",
        "40",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--vocab-size",
        "320",
        "--memory-steps",
        "0",
        "--inline",
        "--no-chart",
        "--out-dir",
        str(tmp_path),
    ]
    assert bench_e2e.main(argv) == 0
    payload = json.loads((tmp_path / "e2e-short.json").read_text())
    assert payload["schema"] == bench_e2e.SCHEMA
    assert payload["device"] == "cpu"
    for key in ("git_commit", "torch", "cpu", "date_utc"):
        assert key in payload["meta"]
    assert payload["settings"]["steps"] == 2 and payload["settings"]["batch_size"] == 2
    assert list(payload["contenders"]) == list(bench_e2e.CONTENDERS)
    for name, r in payload["contenders"].items():
        assert r["status"] == "ok", (name, r.get("reason"))
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > r["pairs_per_s"]
        assert r["peak_memory_mb"] is not None
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
    assert payload["contenders"]["dpo_fast+precomputed_ref"]["reference_setup_s"] > 0

    # Same initial weights, so every contender's first loss is log 2 (policy == reference)...
    for r in payload["contenders"].values():
        assert r["losses"][0] == pytest.approx(math.log(2), rel=1e-4)
    # ...and the same pairs and update, so the second step agrees too, and so do the scored log-probs.
    base = payload["contenders"]["trl"]
    for name, r in payload["contenders"].items():
        assert r["losses"][1] == pytest.approx(base["losses"][1], rel=1e-3), name
        for key in ("logps/chosen", "logps/rejected"):
            assert r["history"][0][key] == pytest.approx(base["history"][0][key], rel=1e-4), (name, key)
    assert payload["loss_agreement"]["ok"] is True
    assert set(payload["loss_agreement"]["contenders"]) == set(bench_e2e.CONTENDERS) - {"trl"}

    markdown = (tmp_path / "e2e-short.md").read_text()
    for name in bench_e2e.CONTENDERS:
        assert f"| {name} |" in markdown
