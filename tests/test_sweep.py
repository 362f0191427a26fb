"""Tests for `dpo-fast sweep`: the recommendation rule, held-out metrics vs float64 forwards, whole sweeps."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import pytest
import torch
from helpers import assert_close

from dpo_fast.commands import sweep as sweep_command
from dpo_fast.demo.run import QUICK, DemoSettings
from dpo_fast.demo.setup import demo_config, demo_setup
from dpo_fast.evaluation.sweep import (
    BetaResult,
    heldout_metrics,
    parse_betas,
    recommend,
    run_sweep,
    train_one,
)
from dpo_fast.evaluation.synth import generate_completions


def result(beta, acc, kl, margin=0.0):
    return BetaResult(beta=beta, reward_accuracy=acc, margin=margin, kl=kl, chosen_drift=0.0)


# ---------------------------------------------------------------------------------------------------------
# The recommendation and the inputs
# ---------------------------------------------------------------------------------------------------------


def test_recommend_best_accuracy_within_budget():
    runs = [result(0.01, 0.90, 0.50), result(0.05, 0.85, 0.20), result(0.1, 0.80, 0.05), result(1.0, 0.60, 0.01)]
    assert recommend(runs).beta == 0.01  # no budget: the best accuracy wins whatever its KL
    assert recommend(runs, kl_budget=0.3).beta == 0.05
    assert recommend(runs, kl_budget=0.05).beta == 0.1  # a KL equal to the budget is within it
    assert recommend(runs, kl_budget=0.001) is None


def test_recommend_ties_go_to_lower_kl_then_smaller_beta():
    assert recommend([result(0.1, 0.8, 0.3), result(0.3, 0.8, 0.1), result(1.0, 0.7, 0.0)]).beta == 0.3
    assert recommend([result(0.3, 0.8, 0.1), result(0.1, 0.8, 0.1)]).beta == 0.1


def test_recommend_skips_nan_runs_and_checks_the_budget():
    assert recommend([result(0.1, math.nan, 0.1), result(0.3, 0.6, math.nan), result(1.0, 0.5, 0.2)]).beta == 1.0
    assert recommend([]) is None
    with pytest.raises(ValueError, match="kl_budget must be >= 0"):
        recommend([result(0.1, 0.5, 0.1)], kl_budget=-1.0)


def test_parse_betas():
    assert parse_betas("0.01, 0.1,1") == [0.01, 0.1, 1.0]
    for text, message in [("0.1,abc", "'abc' is not a number"), ("0.1,0", "finite number > 0"),
                          ("0.1,-1", "finite number > 0"), ("0.1,inf", "finite number > 0"),
                          ("0.1,0.1", "0.1 is given twice"), ("", "is not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_betas(text)


# ---------------------------------------------------------------------------------------------------------
# Held-out metrics
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    return demo_setup(DemoSettings(**QUICK), log=lambda *_: None)


def naive_token_logps(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(list(completion))[:, None]).squeeze(-1)


def naive_logps(model, prompt, completion) -> torch.Tensor:
    return naive_token_logps(model, prompt, completion).sum()


def test_metrics_of_the_reference_itself_are_zero(setup):
    tok = setup.tokenizer
    m = heldout_metrics(setup.model, setup.model, setup.eval_pairs[:6], beta=0.1, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, max_new_tokens=8)
    assert m == {"reward_accuracy": 0.0, "margin": 0.0, "kl": 0.0, "chosen_drift": 0.0}


@pytest.mark.parametrize("kl_samples", ["greedy", "sampled"])
def test_metrics_match_float64_forwards(setup, kl_samples):
    tok, pairs = setup.tokenizer, setup.eval_pairs[:7]
    policy = copy.deepcopy(setup.model)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 0.25
    got = heldout_metrics(policy, setup.model, pairs, beta=beta, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, kl_samples=kl_samples, max_new_tokens=8, seed=3)
    chosen = torch.stack([naive_logps(policy, p.prompt_ids, p.chosen_ids)
                          - naive_logps(setup.model, p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = torch.stack([naive_logps(policy, p.prompt_ids, p.rejected_ids)
                            - naive_logps(setup.model, p.prompt_ids, p.rejected_ids) for p in pairs])
    prompts = list(dict.fromkeys(p.prompt_ids for p in pairs))
    # The same completions heldout_metrics generates (same seed and settings).
    completions = generate_completions(policy, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                       n=1, do_sample=kl_samples == "sampled", max_new_tokens=8, batch_size=32,
                                       seed=3)
    # KL per token by r - 1 - log r, r = pi_ref(y_t) / pi(y_t), over every generated token.
    log_r = torch.cat([naive_token_logps(setup.model, p, c[0]) - naive_token_logps(policy, p, c[0])
                       for p, c in zip(prompts, completions)])
    kl = (log_r.exp() - 1 - log_r).mean()
    expected = torch.tensor([float((chosen > rejected).double().mean()), float(beta * (chosen - rejected).mean()),
                             float(kl), float(chosen.mean())], dtype=torch.float64)
    actual = torch.tensor([got[k] for k in ("reward_accuracy", "margin", "kl", "chosen_drift")], dtype=torch.float64)
    assert_close(actual, expected, torch.float32, f"held-out metrics ({kl_samples})")
    assert got["chosen_drift"] != 0.0 and got["kl"] > 0.0


def test_kl_is_never_negative_where_the_mean_log_ratio_is(setup):
    """On a few sampled completions the plain mean of log pi - log pi_ref can be negative; r - 1 - log r cannot."""
    tok, pairs = setup.tokenizer, setup.eval_pairs[:3]
    prompts = list(dict.fromkeys(p.prompt_ids for p in pairs))
    policy = copy.deepcopy(setup.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for seed in range(40):
        completions = generate_completions(policy, prompts, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id, n=1, do_sample=True, max_new_tokens=4,
                                           batch_size=32, seed=seed)
        mean_log_ratio = sum(naive_logps(policy, p, c[0]) - naive_logps(setup.model, p, c[0])
                             for p, c in zip(prompts, completions)) / sum(len(c[0]) for c in completions)
        if mean_log_ratio < 0:
            break
    assert mean_log_ratio < 0, "no seed gave a negative mean log-ratio: the test shows nothing"
    got = heldout_metrics(policy, setup.model, pairs, beta=0.1, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, kl_samples="sampled", max_new_tokens=4, seed=seed)
    assert got["kl"] > 0.0


# ---------------------------------------------------------------------------------------------------------
# Whole sweeps
# ---------------------------------------------------------------------------------------------------------


def _close(a: dict, b: dict, keys=("reward_accuracy", "margin", "kl", "chosen_drift")) -> None:
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_demo_sweep_three_betas_from_the_same_weights(tmp_path, setup, capsys):
    out = tmp_path / "sweep"
    status = sweep_command.main(["--demo", "--quick", "--beta", "0.03,0.1,0.3", "--output-dir", str(out),
                             "--kl-budget", "1e9", "--max-steps", "2"])
    assert status == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["beta"] for r in summary["results"]] == [0.03, 0.1, 0.3]
    assert (out / "sweep.png").stat().st_size > 0
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]
    expected = recommend([BetaResult(**r) for r in summary["results"]], kl_budget=1e9)
    assert summary["recommended_beta"] == expected.beta
    assert f"recommended beta: {expected.beta:g}" in printed
    # Run 3 must have started from the SFT weights, not from run 2's: redo it alone from a fresh copy.
    config = demo_config(setup.settings, setup.train_pairs, str(tmp_path / "alone"), beta=0.3, max_steps=2)
    reference = copy.deepcopy(setup.model).requires_grad_(False)
    initial = {k: v.clone() for k, v in setup.model.state_dict().items()}
    alone = train_one(copy.deepcopy(setup.model).requires_grad_(True), reference, setup.tokenizer,
                      setup.train_pairs, setup.eval_pairs, config=config, kl_samples="sampled",
                      max_new_tokens=setup.settings.max_new_tokens)
    _close(dataclasses.asdict(alone), summary["results"][2])
    assert all(torch.equal(v, setup.model.state_dict()[k]) for k, v in initial.items())


@pytest.mark.slow  # two Python processes start and import torch + transformers
def test_sweep_in_processes_matches_in_process(tmp_path, setup):
    config = demo_config(setup.settings, setup.train_pairs, str(tmp_path), max_steps=2)
    kwargs = dict(base_config=config, kl_samples="greedy", max_new_tokens=8)
    inline = run_sweep(setup.model, setup.tokenizer, setup.train_pairs, setup.eval_pairs, [0.2],
                       output_dir=str(tmp_path / "inline"), log=lambda *_: None, **kwargs)
    spawned = run_sweep(setup.model, setup.tokenizer, setup.train_pairs, setup.eval_pairs, [0.2],
                        output_dir=str(tmp_path / "spawned"), processes=True, log=lambda *_: None, **kwargs)
    _close(dataclasses.asdict(inline.results[0]), dataclasses.asdict(spawned.results[0]))
    assert os.path.isfile(tmp_path / "spawned" / "initial" / "config.json")


def test_sweep_refuses_a_used_output_dir_before_training(tmp_path, setup):
    config = demo_config(setup.settings, setup.train_pairs, str(tmp_path), overwrite_output_dir=False)
    used = tmp_path / "beta_0.3"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="beta_0.3"):
        run_sweep(setup.model, setup.tokenizer, setup.train_pairs, setup.eval_pairs, [0.1, 0.3],
                  base_config=config, output_dir=str(tmp_path), log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["beta_0.3"]


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--beta", "0.1,x"], "'x' is not a number"),
    (["--demo", "--beta", "0.1", "--kl-budget", "-1"], "--kl-budget must be >= 0"),
    (["--beta", "0.1"], "--model and --data are needed"),
    (["--demo", "--beta", "0.1", "--model", "m"], "--demo brings its own model"),
])
def test_command_bad_input(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert sweep_command.main(argv + ["--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_command_rejects_a_bad_training_flag(capsys):
    with pytest.raises(SystemExit):
        sweep_command.main(["--demo", "--beta", "0.1", "--learning-rate", "fast"])
    assert "learning_rate must be float" in capsys.readouterr().err


def test_command_on_files_holds_out_a_fraction(tmp_path, setup, capsys):
    from dpo_fast.demo import tasks

    model_dir = tmp_path / "model"
    setup.model.save_pretrained(model_dir)
    setup.tokenizer.save_pretrained(model_dir)
    rows = tasks.make_preference_rows(tasks.make_prompts(12, 1, seed=5).train, seed=1)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows))
    (tmp_path / "train.yaml").write_text("learning_rate: 1e-3\nmax_steps: 1\nbeta: 7.0\n")
    out = tmp_path / "sweep"
    status = sweep_command.main(["--model", str(model_dir), "--data", str(data), "--beta", "0.1,0.5", "--output-dir",
                             str(out), "--eval-fraction", "0.25", "--config", str(tmp_path / "train.yaml"),
                             "--max-length", "32", "--per-device-train-batch-size", "4", "--max-new-tokens", "6"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["eval_pairs"] == 3 and [r["beta"] for r in summary["results"]] == [0.1, 0.5]
    state = json.loads((out / "beta_0.5" / "metrics.jsonl").read_text().splitlines()[-1])
    assert state["step"] == 1  # max_steps from the YAML file; its beta is the sweep's, not 7.0
    assert summary["recommended_beta"] in (0.1, 0.5)
