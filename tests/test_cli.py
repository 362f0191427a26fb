"""The `dpo-fast` command: generated flags, early configuration errors, an end-to-end tiny run, demo dispatch."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import tiny_model  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.commands import flags, train  # noqa: E402
from dpo_fast.commands import main as cli  # noqa: E402
from dpo_fast.training.config import DPOConfig  # noqa: E402
from dpo_fast.training.metrics import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    words = ("one", "two", "three", "four", "five", "seven")
    path.write_text("".join(json.dumps({"prompt": f"Explain number {w}", "chosen": f" sure {w} is a number",
                                        "rejected": " no"}) + "\n" for w in words))
    return str(path)


@pytest.fixture
def no_training(monkeypatch):
    """Configuration errors must stop the command before any model is loaded or trained."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the command went on to load a model despite a configuration error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def run_cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_every_config_field_has_a_flag_with_its_help():
    parser = cli.build_parser(["train"])
    train = parser._subparsers._group_actions[0].choices["train"]
    options = {opt: action for action in train._actions for opt in action.option_strings}
    for f in dataclasses.fields(DPOConfig):
        dashed = "--" + f.name.replace("_", "-")
        assert dashed in options, dashed
        assert options[dashed].dest == f.name
        assert f.metadata["help"] in options[dashed].help
        if "_" in f.name:
            assert options["--" + f.name].dest == f.name


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("beta: 0.25\nlearning_rate: 2e-6\nlayout: packed\n")
    parser = cli.build_parser(["train"])
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--config", str(cfg), "--beta", "0.5",
                              "--gradient_checkpointing", "--output-dir", str(tmp_path / "o")])
    config = train.config_from_args(parser, args)
    assert config.beta == 0.5 and config.learning_rate == 2e-6 and config.layout == "packed"
    assert config.gradient_checkpointing and config.output_dir == str(tmp_path / "o")
    assert config.seed == DPOConfig().seed


@pytest.mark.parametrize("extra, message", [
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--learning-rate", "fast"], "--learning-rate must be float"),
    (["--layout", "ragged"], "--layout ragged is not known"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], "--label-smoothing 0.1 has no effect"),
    (["--loss-type", "simpo", "--ref-model", "some/model"], "reference-free"),
    (["--ref-model", "none"], "needs a reference model"),
    (["--config", "/nonexistent/cfg.yaml"], "does not exist"),
    (["--max-length", "1"], "error: --max-length must be an integer >= 2"),
    (["--save-minutes", "-1"], "error: --save-minutes must be a finite number >= 0"),
])
def test_bad_configuration_fails_before_loading_anything(tmp_path, capsys, no_training, model_dir, data_file,
                                                         extra, message):
    err = run_cli_error(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(tmp_path / "o")]
                        + extra, capsys)
    assert message in err, err
    # One error line and a pointer to --help: no usage block, no traceback, no Python field names.
    assert err.splitlines() == [err.splitlines()[0], "See 'dpo-fast train --help' for the options."], err
    assert err.startswith("dpo-fast train: error: ") and "usage:" not in err and "_" not in message


def test_missing_model_path_and_used_output_dir_fail_early(tmp_path, capsys, no_training, model_dir, data_file):
    err = run_cli_error(["train", "--model", str(tmp_path / "no-model"), "--data", data_file,
                         "--output-dir", str(tmp_path / "o")], capsys)
    assert f"--model: '{tmp_path / 'no-model'}' is not a local directory" in err
    used = tmp_path / "used"
    (used / "checkpoint-3").mkdir(parents=True)
    err = run_cli_error(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(used)], capsys)
    assert "already holds a run" in err and "checkpoint-3" in err
    assert "--resume-from-checkpoint latest" in err and "--overwrite-output-dir" in err


@pytest.fixture
def no_hub(monkeypatch):
    """Local paths must never reach the Hub."""
    from huggingface_hub import HfApi

    def refuse(*a, **k):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(HfApi, "model_info", refuse)


@pytest.mark.parametrize("value", ["./no_such_model", "runs/x", "a/b/c", "file"])
def test_a_path_like_model_that_is_not_a_directory_fails_at_once(tmp_path, monkeypatch, capsys, no_training, no_hub,
                                                                   data_file, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/x" is a path because runs/ exists here
    (tmp_path / "file").write_text("not a model")
    err = run_cli_error(["train", "--model", value, "--data", data_file, "--output-dir", str(tmp_path / "o")],
                        capsys)
    assert err.startswith(f"dpo-fast train: error: --model: '{value}' is not a local directory"), err


def test_a_hub_name_the_hub_cannot_confirm_is_one_line_under_model(tmp_path, monkeypatch, capsys, no_training,
                                                                   data_file):
    from huggingface_hub import HfApi, constants

    calls = []

    def unreachable(self, name, timeout=None, **k):
        calls.append(timeout)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    argv = ["train", "--model", "some-org/missing-model", "--data", data_file, "--output-dir", str(tmp_path / "o")]
    err = run_cli_error(argv, capsys)
    assert err.startswith("dpo-fast train: error: --model: 'some-org/missing-model' is not a local directory, and "
                          "the Hugging Face Hub could not be reached"), err
    assert "HF_HUB_OFFLINE=1" in err and "--tokenizer" not in err
    assert calls == [10.0]  # one lookup, with the short timeout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = run_cli_error(argv, capsys)
    assert "HF_HUB_OFFLINE is set while the Hugging Face cache holds no copy of it" in err
    assert calls == [10.0]  # offline: no lookup at all


def test_resume_latest_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys, no_training, model_dir, data_file):
    err = run_cli_error(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(tmp_path / "o"),
                         "--resume-from-checkpoint", "latest"], capsys)
    assert err.startswith("dpo-fast train: error: --resume-from-checkpoint latest but ")
    assert "no valid checkpoint" in err
    assert len(err.splitlines()) == 2 and "Traceback" not in err


def test_an_unwritable_output_dir_fails_before_loading(tmp_path, capsys, no_training, model_dir, data_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = run_cli_error(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(blocker / "run")],
                        capsys)
    assert "is not writable" in err and str(blocker / "run") in err


def test_strict_stops_at_the_first_malformed_row(tmp_path, capsys, no_training, model_dir, data_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(data_file).read() + "{not json\n")
    err = run_cli_error(["train", "--model", model_dir, "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                         "--strict"], capsys)
    assert "--data: " in err and "row 6" in err and "not valid JSON" in err


def test_loss_type_help_lists_the_choices():
    from dpo_fast.loss.formulas import LOSS_TYPES

    train = cli.build_parser(["train"])._subparsers._group_actions[0].choices["train"]
    action = next(a for a in train._actions if "--loss-type" in a.option_strings)
    assert ", ".join(LOSS_TYPES) in action.help and "see dpo_fast" not in action.help.replace("(see dpo_fast", "")


@pytest.mark.parametrize("message, expected", [
    ("resume_from_checkpoint='latest' but 'o' holds no valid checkpoint",
     "--resume-from-checkpoint latest but 'o' holds no valid checkpoint"),
    ("set overwrite_output_dir=True", "set --overwrite-output-dir"),
    ("merge_lora=True needs LoRA adapters (lora_r > 0)", "--merge-lora needs LoRA adapters (--lora-r > 0)"),
    ("max_tokens_per_row=8 is smaller than max_length=16", "--max-tokens-per-row 8 is smaller than --max-length 16"),
    ("beta must be > 0; see --max-length", "beta must be > 0; see --max-length"),
    ("report_to_tensorboard=False", "--no-report-to-tensorboard"),
])
def test_flag_spelling(message, expected):
    assert flags.flag_spelling(message) == expected


def test_train_end_to_end(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(out),
                     "--max-steps", "2", "--per-device-train-batch-size", "3", "--logging-steps", "1",
                     "--layout", "prefix_shared", "--max-length", "48", "--learning-rate", "1e-3",
                     "--no-report-to-tensorboard", "--save-steps", "1", "--dtype", "float32"])
    assert code == 0
    captured = capsys.readouterr()
    assert "done: 2 steps; loss " in captured.out and "(mean over step 2)" in captured.out
    assert "model and tokenizer saved in" in captured.out and "last step's loss " in captured.out
    assert "rows read        6" in captured.err and "pairs kept       6" in captured.err
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]
    assert os.path.isfile(out / "final" / "model.safetensors")
    assert os.path.isfile(out / "final" / "tokenizer.json")
    assert os.path.isdir(out / "checkpoint-2")
    # Every checkpoint holds the tokenizer: `score` loads one as a model directory.
    scores = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--model", str(out / "checkpoint-1"), "--ref-model", model_dir, "--data", data_file,
                     "--max-length", "48", "--n-bootstrap", "10", "--output", str(scores)]) == 0
    assert len(scores.read_text().splitlines()) == 6


def test_a_diverging_run_exits_1_naming_the_step(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(out), "--max-steps", "8",
                     "--per-device-train-batch-size", "3", "--max-length", "48", "--learning-rate", "1e20",
                     "--warmup-ratio", "0", "--max-nonfinite-steps", "2", "--no-report-to-tensorboard",
                     "--dtype", "float32"])
    assert code == 1
    err = capsys.readouterr().err
    assert "dpo-fast train: error: stopped at step 3: 2 consecutive steps had a non-finite loss" in err
    assert not (out / "final").exists()


def test_pair_logps_refusal_says_why():
    from dpo_fast.training.scoring import pair_logps

    tokenizer = make_tokenizer()
    rows = [{"prompt": "a", "chosen": " yes", "rejected": " no"},
            {"prompt": "b", "chosen": " same", "rejected": " same"}]
    reason = "chosen and rejected token ids identical"
    with pytest.raises(ValueError, match=rf"^pairs\[1\] cannot be scored: {reason} \(max_length=64\)$"):
        pair_logps(tiny_model(len(tokenizer)), tokenizer, rows, max_length=64)


def test_demo_subcommand_is_dispatched_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("dpo_fast.commands.demo")
    fake.add_arguments = lambda parser: parser.add_argument("--steps", type=int, default=1)
    fake.run = lambda args: seen.setdefault("steps", args.steps) and 0
    monkeypatch.setitem(sys.modules, "dpo_fast.commands.demo", fake)
    import dpo_fast.commands

    monkeypatch.setattr(dpo_fast.commands, "demo", fake, raising=False)
    assert cli.main(["demo", "--steps", "7"]) == 0
    assert seen == {"steps": 7}
    # `train` does not need the demo module: building its parser leaves it alone.
    monkeypatch.setitem(sys.modules, "dpo_fast.commands.demo", None)
    cli.build_parser(["train"])


@pytest.mark.parametrize("command", sorted(cli.LAZY_COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dpo-fast {command}") and "--" in out


def test_resuming_with_another_batch_size_or_data_is_refused_before_loading(tmp_path, capsys, monkeypatch, model_dir,
                                                                           data_file):
    out = str(tmp_path / "run")
    common = ["train", "--model", model_dir, "--output-dir", out, "--max-length", "48", "--no-report-to-tensorboard",
              "--dtype", "float32", "--logging-steps", "1"]
    assert cli.main(common + ["--data", data_file, "--max-steps", "1", "--save-steps", "1",
                              "--per-device-train-batch-size", "3"]) == 0
    capsys.readouterr()
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the command loaded a model for a resume it must refuse")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    resume = common + ["--resume-from-checkpoint", "latest", "--max-steps", "2"]
    err = run_cli_error(resume + ["--data", data_file, "--per-device-train-batch-size", "2"], capsys)
    err = err[err.index("dpo-fast train: error:"):]  # after the data summary
    assert err.startswith("dpo-fast train: error: cannot resume from ") and "checkpoint-1" in err
    assert "--per-device-train-batch-size: checkpoint 3, now 2" in err and "global_batch: checkpoint 3, now 2" in err
    monkeypatch.undo()
    # A changed learning rate is accepted with a one-line warning naming both values; the resume is announced.
    changed_lr = ["--data", data_file, "--per-device-train-batch-size", "3", "--learning-rate", "1e-3"]
    assert cli.main(resume + changed_lr) == 0
    err = capsys.readouterr().err
    assert "\nwarning: resuming from " in err and "learning_rate: checkpoint 5e-07, now 0.001: ignored" in err
    assert "resumed from checkpoint-1 (step 1, epoch 0)" in err and "UserWarning" not in err
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(data_file).readlines()[:5]))
    err = run_cli_error(resume + ["--data", str(other), "--per-device-train-batch-size", "3"], capsys)
    assert "num_train_pairs: checkpoint 6, now 5" in err


def test_done_line_says_which_loss_is_which():
    trainer = types.SimpleNamespace(global_step=7)
    config = DPOConfig(logging_steps=5, output_dir="out")
    line = train._done_line(trainer, config, {"loss": 0.5, "last_step_loss": 0.25, "rewards/accuracies": 0.75})
    assert line == ("done: 7 steps; loss 0.5 (mean over steps 6-7); last step's loss 0.25; "
                    f"rewards/accuracies=0.75; model and tokenizer saved in {os.path.join('out', 'final')}")
