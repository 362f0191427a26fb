"""Smoke test of the end-to-end benchmark (benchmarks/bench_e2e.py): a micro model, 3 steps, every contender.

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
        (["--steps", "2"], "--steps"),
        (["--length-search"], "--device cuda"),
        (["--contenders", "trl,fast"], "--contenders"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(argv)
    assert message in capsys.readouterr().err


def test_search_longest_doubles_then_bisects():
    limit = 5000

    def fits(length):
        return {"status": "ok"} if length <= limit else {"status": "oom", "reason": "out of memory"}

    found = bench_e2e.search_longest(fits, 1024, 65536, 0.125, deadline=float("inf"))
    lengths = [t["pair_tokens"] for t in found["tries"]]
    assert lengths[:4] == [1024, 2048, 4096, 8192]  # doubling to the first failure, then bisecting
    best, failure = found["longest_fitting"]["pair_tokens"], found["first_failure"]["pair_tokens"]
    assert best <= limit < failure and failure - best <= 0.125 * best and found["complete"]
    # Everything fits up to the maximum: no failure, complete.
    everything = bench_e2e.search_longest(lambda n: {"status": "ok"}, 1024, 4096, 0.125, float("inf"))
    assert everything["longest_fitting"]["pair_tokens"] == 4096 and everything["first_failure"] is None
    # A failure that is no memory answer stops the search; an exhausted time budget leaves it incomplete.
    broken = bench_e2e.search_longest(lambda n: {"status": "ok"} if n < 4096 else {"status": "error"},
                                      1024, 65536, 0.125, float("inf"))
    assert [t["pair_tokens"] for t in broken["tries"]] == [1024, 2048, 4096] and broken["complete"]
    late = bench_e2e.search_longest(fits, 1024, 65536, 0.125, deadline=0.0)
    assert late["tries"] == [] and not late["complete"]


def test_three_step_run_writes_results_and_losses_agree(tmp_path):
    argv = [
        "--profile",
        "short",
        "--steps",
        "3",
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
        "--weights-cache",
        str(tmp_path / "weights"),
    ]
    assert bench_e2e.main(argv) == 0
    cached = list((tmp_path / "weights").iterdir())  # one complete entry, reused by a later run
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    payload = json.loads((tmp_path / "e2e-short.json").read_text())
    assert payload["schema"] == bench_e2e.SCHEMA
    assert payload["device"] == "cpu"
    for key in ("git_commit", "torch", "cpu", "date_utc"):
        assert key in payload["meta"]
    assert payload["settings"]["steps"] == 3 and payload["settings"]["batch_size"] == 2
    assert payload["settings"]["gradient_checkpointing"] is True
    assert list(payload["contenders"]) == list(bench_e2e.CONTENDERS)
    # Liger's kernels need CUDA: skipped on the CPU, with the reason.
    assert payload["contenders"].pop("trl+liger")["status"] == "skipped"
    for name, r in payload["contenders"].items():
        assert r["status"] == "ok", (name, r.get("reason"))
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > r["pairs_per_s"]
        assert len(r["step_s"]) == 1 and r["median_step_s"] == r["mean_step_s"] == r["step_s"][0]
        assert r["peak_memory_mb"] is not None
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
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
    assert set(payload["loss_agreement"]["contenders"]) == set(bench_e2e.CONTENDERS) - {"trl", "trl+liger"}

    markdown = (tmp_path / "e2e-short.md").read_text()
    for name in bench_e2e.CONTENDERS:
        assert f"| {name} |" in markdown
    assert "Gradient checkpointing on for every contender" in markdown


def test_search_worker_plumbing_on_the_cpu(tmp_path, monkeypatch):
    """The length search's worker, its CUDA memory counters stood in for: real trainings of a micro model at
    each length tried, an out-of-memory error above 300 tokens, results rewritten after every try."""
    import torch

    args = bench_e2e.parse_args(["--hidden-size", "32", "--layers", "1", "--vocab-size", "320", "--batch-size", "1",
                                 "--out-dir", str(tmp_path)])
    prep = bench_e2e._prepare_data(args, e2e_data.PROFILES["long"], tmp_path, 2)
    prep.update(bench_e2e._prepare_model(args, prep["tokenizer"], tmp_path, 2048))
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 7 * 2**20)
    real_train, lengths = bench_e2e._train, []

    def train(s, steps, tag):
        lengths.append(s.max_length)
        if s.max_length > 300:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_train(s, steps, tag)

    monkeypatch.setattr(bench_e2e, "_train", train)
    for contender in ("dpo_fast", "trl"):
        settings = bench_e2e._settings(args, contender, prep, tmp_path, steps=2)
        settings.search = {"start": 128, "max": 4096, "resolution": 0.5, "budget_s": 600}
        out = tmp_path / f"search-{contender}.json"
        bench_e2e.run_search_worker(settings, str(out))
        result = json.loads(out.read_text())
        found = result["search"]
        assert result["status"] == "ok" and found["complete"], found
        best, failure = found["longest_fitting"], found["first_failure"]
        assert best["pair_tokens"] <= 300 < failure["pair_tokens"] and failure["status"] == "oom"
        assert best["peak_memory_mb"] == 7.0
    assert lengths[:4] == [128, 256, 512, 384]
