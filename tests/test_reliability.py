"""Training that breaks the way real runs break: divergence, a rollback, a resume with other settings, a
stop signal, an unwritable output directory, a frozen rank. Tiny Llama on the CPU."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import make_config, random_pairs, tiny_model  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.training import checkpoint as ckpt  # noqa: E402
from dpo_fast.training.metrics import TrainingDiverged, read_metrics  # noqa: E402
from dpo_fast.training.trainer import DistributedTimeout, DPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _trainer(tmp_path, tokenizer, pairs=None, **kw) -> DPOTrainer:
    kw = {"max_steps": 4, "per_device_train_batch_size": 2, **kw}
    pairs = pairs if pairs is not None else random_pairs(8, len(tokenizer), seed=5)
    return DPOTrainer(tiny_model(len(tokenizer)), tokenizer, pairs, config=make_config(tmp_path, **kw))


def _weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    return ckpt.load_safetensors_dir(checkpoint_dir)


# ------------------------------------------------------------------------------------------------
# Non-finite steps and divergence


def test_nonfinite_steps_are_skipped_and_stop_the_run(tmp_path, tokenizer):
    # lr 1e20: step 1 is finite (weights ~1e20), every later loss is NaN.
    trainer = _trainer(tmp_path, tokenizer, max_steps=12, learning_rate=1e20, save_steps=1, max_nonfinite_steps=3)
    with pytest.raises(TrainingDiverged, match=r"stopped at step 4: 3 consecutive steps had a non-finite loss"):
        trainer.train()
    out = str(tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2, 3]
    assert not os.path.exists(os.path.join(out, "final"))
    for _, path in ckpt.list_checkpoints(out):
        assert all(torch.isfinite(w).all() for w in _weights(path).values()), path
    # Skipped on the device: weights, moments and the optimizer's step count stay those of step 1.
    for name, w in _weights(os.path.join(out, "checkpoint-1")).items():
        assert torch.equal(_weights(os.path.join(out, "checkpoint-3"))[name], w), name
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {1.0}
    assert ckpt.resolve_resume_path("latest", out).endswith("checkpoint-3")
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    skipped = [r for r in records if "loss" in r and r["step"] > 1]
    assert [r["skipped_steps"] for r in skipped] == [1, 1, 1]
    assert any("non-finite loss or gradient norm" in r.get("warning", "") for r in records)


def test_weights_that_overflow_are_never_saved(tmp_path, tokenizer):
    # lr 1e39: the first AdamW update (about lr per weight) overflows float32 while its loss and grad norm were finite.
    trainer = _trainer(tmp_path, tokenizer, learning_rate=1e39, save_steps=1)
    with pytest.raises(TrainingDiverged, match="stopped at step 1: the weights hold NaN or infinite values"):
        trainer.train()
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == []
    assert not os.path.exists(tmp_path / "run" / "final")


def test_divergence_warnings_reach_metrics_and_the_returned_summary(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=9, logging_steps=3)
    real_step = trainer.optimizer_step

    def step():
        if trainer.global_step + 1 == 2:
            trainer.step_loss = trainer.step_loss * 1e4  # a loss that jumps by four orders of magnitude
        if trainer.global_step + 1 >= 4:
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()  # a dead model: the gradient is exactly 0 from step 4 on
        return real_step()

    trainer.optimizer_step = step
    result = trainer.train()
    jump = [w for w in result["warnings"] if "the loss jumped" in w]
    dead = [w for w in result["warnings"] if "exactly 0 for 5 steps" in w]
    assert len(jump) == 1 and jump[0].startswith("step 2: ") and len(dead) == 1 and dead[0].startswith("step 8: ")
    logged = [r["warning"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "warning" in r]
    assert logged == result["warnings"]
    assert result["last_step_loss"] != result["loss"]  # the window mean and the last step, both returned


# ------------------------------------------------------------------------------------------------
# Resume: settings, lineage, safe loading


def test_resume_warns_about_a_changed_learning_rate_and_says_where_it_resumed(tmp_path, tokenizer, capsys):
    _trainer(tmp_path, tokenizer, max_steps=2, save_steps=2).train()
    capsys.readouterr()
    resumed = _trainer(tmp_path, tokenizer, max_steps=3, learning_rate=2e-3, resume_from_checkpoint="latest")
    with pytest.warns(UserWarning, match=r"learning_rate: checkpoint 0.001, now 0.002: ignored, the saved optimizer"):
        resumed.train()
    assert "resumed from checkpoint-2 (step 2, epoch 0)" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match=r"beta: checkpoint 0.1, now 0.2"):
        _trainer(tmp_path, tokenizer, max_steps=4, beta=0.2, resume_from_checkpoint="latest").train()


def test_latest_follows_the_current_run_after_a_rollback(tmp_path, tokenizer):
    _trainer(tmp_path, tokenizer, max_steps=4, save_steps=1).train()
    out = str(tmp_path / "run")
    rollback = _trainer(tmp_path, tokenizer, max_steps=4, save_steps=1,
                        resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    real_step = rollback.optimizer_step

    def crash_at_step_4():
        if rollback.global_step + 1 == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step()

    rollback.optimizer_step = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        rollback.train()
    # The abandoned run's checkpoint-3 and checkpoint-4 were moved aside; latest is the rollback's checkpoint-3.
    abandoned = sorted(os.listdir(os.path.join(out, ckpt.ABANDONED_DIR)))
    assert [name.split("-")[1] for name in abandoned] == ["3", "4"]
    latest = ckpt.resolve_resume_path("latest", out)
    assert latest.endswith("checkpoint-3")
    lineage = ckpt.read_trainer_state(latest)["lineage"]
    assert lineage["run_index"] == 1 and lineage["resumed_from"]["checkpoint"] == "checkpoint-2"


def test_optimizer_state_loads_without_running_code(tmp_path, tokenizer):
    _trainer(tmp_path, tokenizer, max_steps=1, save_steps=1).train()
    path = str(tmp_path / "run" / "checkpoint-1")
    state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    state["extra"] = datetime.date(2026, 1, 1)  # any pickled object: weights_only=True refuses it
    torch.save(state, os.path.join(path, "optimizer.pt"))
    ckpt.write_manifest(path)
    with pytest.raises(ckpt.CheckpointError, match="does not load with weights_only=True"):
        _trainer(tmp_path, tokenizer, max_steps=2, resume_from_checkpoint="latest").train()


# ------------------------------------------------------------------------------------------------
# Saves: periodic, on a signal, and where they cannot be written


def test_periodic_saves_by_minutes_are_on_by_default(tmp_path, tokenizer):
    assert make_config(tmp_path).save_minutes == 30.0 and make_config(tmp_path).save_steps == 0
    _trainer(tmp_path, tokenizer, max_steps=3, save_minutes=1e-9).train()  # due after every step
    # Each one replaces the previous: periodic saves take the disk of one checkpoint.
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "run"))] == [3]
    # Those of save_steps stay, and replace the periodic one before them.
    _trainer(tmp_path / "steps", tokenizer, max_steps=5, save_steps=2, save_minutes=1e-9).train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "steps" / "run"))] == [2, 4, 5]


_SIGTERM_SCRIPT = """
import sys
import pathlib
sys.path.insert(0, {tests!r})
from test_trainer import make_config, random_pairs, tiny_model
from tiny_tokenizer import make_tokenizer
from dpo_fast.training import checkpoint as ckpt
from dpo_fast.training.trainer import DPOTrainer

tokenizer = make_tokenizer()
config = make_config(pathlib.Path({tmp!r}), max_steps=100000, per_device_train_batch_size=2, logging_steps=1)
trainer = DPOTrainer(tiny_model(len(tokenizer)), tokenizer, random_pairs(8, len(tokenizer)), config=config)
try:
    trainer.train()
except ckpt.TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
"""


def test_sigterm_finishes_the_step_saves_and_exits_with_a_message(tmp_path, tokenizer):
    script = _SIGTERM_SCRIPT.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    metrics = tmp_path / "run" / "metrics.jsonl"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the training never logged a step"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM after step ") and "--resume-from-checkpoint latest" in line
    step = int(line.split("after step ")[1].split(":")[0])
    out = str(tmp_path / "run")
    assert ckpt.resolve_resume_path("latest", out) == os.path.join(out, f"checkpoint-{step}")
    assert f"checkpoint saved in {os.path.join(out, f'checkpoint-{step}')}" in line
    assert read_metrics(str(metrics))[-1]["step"] == step  # the signal ended the step it arrived in, no later one
    resumed = _trainer(tmp_path, tokenizer, pairs=random_pairs(8, len(tokenizer)), max_steps=step + 1,
                       resume_from_checkpoint="latest")
    with pytest.warns(UserWarning, match="max_steps"):
        resumed.train()
    assert resumed.global_step == step + 1


def test_an_unwritable_output_dir_fails_before_the_model_moves(tmp_path, tokenizer):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    model = tiny_model(len(tokenizer))

    def refuse(*a, **k):
        raise AssertionError("the trainer used the model before checking output_dir")

    model.to = refuse
    with pytest.raises(ckpt.CheckpointWriteError, match="is not writable"):
        DPOTrainer(model, tokenizer, random_pairs(4, len(tokenizer)),
                   config=make_config(tmp_path, output_dir=str(blocker / "run")))


# ------------------------------------------------------------------------------------------------
# Distributed: the timeout


def test_ddp_timeout_reaches_init_process_group(tmp_path, tokenizer, monkeypatch):
    import torch.distributed as dist

    seen = {}

    class Stop(Exception):
        pass

    def init(backend, **kwargs):
        seen.update(backend=backend, **kwargs)
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Stop):
        _trainer(tmp_path, tokenizer, ddp_timeout=7)
    assert seen["timeout"] == datetime.timedelta(seconds=7)
    assert make_config(tmp_path).ddp_timeout == 1800


def test_a_collective_timeout_names_the_rank(tmp_path, tokenizer, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer)
    trainer.distributed, trainer.rank, trainer.world_size = True, 1, 2

    def frozen(*a, **k):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 2000ms for recv operation")

    monkeypatch.setattr(trainer, "_train", frozen)
    with pytest.raises(DistributedTimeout, match=r"^rank 1 of 2: a collective waited more than ddp_timeout=1800 s"):
        trainer.train()


def test_raw_rows_print_the_data_summary_with_the_layout_padding(tmp_path, tokenizer, capsys):
    rows = [{"prompt": f"say {w}", "chosen": f" {w} ok", "rejected": " no"} for w in ("a", "b", "c")]
    rows.append({"prompt": "same", "chosen": " x", "rejected": " x"})
    _trainer(tmp_path, tokenizer, pairs=rows, max_steps=1)
    err = capsys.readouterr().err
    assert "rows read        4" in err and "pairs kept       3" in err and "skipped          1: 1 chosen id" in err
    assert "of the batch positions are padding" in err
