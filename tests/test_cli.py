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

from dpo_fast import cli  # noqa: E402
from dpo_fast.config import DPOConfig  # noqa: E402
from dpo_fast.metrics import read_metrics  # noqa: E402


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
    config = cli.config_from_args(parser, args)
    assert config.beta == 0.5 and config.learning_rate == 2e-6 and config.layout == "packed"
    assert config.gradient_checkpointing and config.output_dir == str(tmp_path / "o")
    assert config.seed == DPOConfig().seed


@pytest.mark.parametrize("extra, message", [
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--learning-rate", "fast"], "learning_rate must be float"),
    (["--layout", "ragged"], "layout='ragged' is not known"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], "label_smoothing=0.1 has no effect"),
    (["--loss-type", "simpo", "--ref-model", "some/model"], "reference-free"),
    (["--ref-model", "none"], "needs a reference model"),
    (["--config", "/nonexistent/cfg.yaml"], "does not exist"),
])
def test_bad_configuration_fails_before_loading_anything(tmp_path, capsys, no_training, model_dir, data_file,
                                                         extra, message):
    err = run_cli_error(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(tmp_path / "o")]
                        + extra, capsys)
    assert message in err, err


def test_missing_model_path_and_used_output_dir_fail_early(tmp_path, capsys, no_training, model_dir, data_file):
    err = run_cli_error(["train", "--model", str(tmp_path / "no-model"), "--data", data_file,
                         "--output-dir", str(tmp_path / "o")], capsys)
    assert "--model" in err and "does not exist" in err
    used = tmp_path / "used"
    (used / "checkpoint-3").mkdir(parents=True)
    err = run_cli_error(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(used)], capsys)
    assert "already holds a run" in err and "checkpoint-3" in err


def test_train_end_to_end(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", model_dir, "--data", data_file, "--output-dir", str(out),
                     "--max-steps", "2", "--per-device-train-batch-size", "3", "--logging-steps", "1",
                     "--layout", "prefix_shared", "--max-length", "48", "--learning-rate", "1e-3",
                     "--no-report-to-tensorboard", "--save-steps", "1", "--dtype", "float32"])
    assert code == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]
    assert os.path.isfile(out / "final" / "model.safetensors")
    assert os.path.isfile(out / "final" / "tokenizer.json")
    assert os.path.isdir(out / "checkpoint-2")


def test_demo_subcommand_is_dispatched_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("dpo_fast.demo")
    fake.add_arguments = lambda parser: parser.add_argument("--steps", type=int, default=1)
    fake.run = lambda args: seen.setdefault("steps", args.steps) and 0
    monkeypatch.setitem(sys.modules, "dpo_fast.demo", fake)
    import dpo_fast

    monkeypatch.setattr(dpo_fast, "demo", fake, raising=False)
    assert cli.main(["demo", "--steps", "7"]) == 0
    assert seen == {"steps": 7}
    # `train` does not need the demo module: building its parser leaves it alone.
    monkeypatch.setitem(sys.modules, "dpo_fast.demo", None)
    cli.build_parser(["train"])


@pytest.mark.parametrize("command", sorted(cli.LAZY_COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dpo-fast {command}") and "--" in out
