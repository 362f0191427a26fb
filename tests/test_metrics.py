"""metrics.jsonl reading after a crash, and the training-health monitor (non-finite steps, dead gradient, jumps)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_fast.training.metrics import MetricsLogger, TrainingHealth, read_metrics, truncate_metrics


def write_log(path, steps):
    logger = MetricsLogger(str(path), tensorboard=False)
    for step in steps:
        logger.log(step, {"loss": 0.5 / step})
    logger.close()
    return path / "metrics.jsonl"


def test_a_partial_last_line_is_dropped_with_a_warning(tmp_path):
    path = write_log(tmp_path, [1, 2, 3])
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # a crash in the middle of the write
    with pytest.warns(UserWarning, match="partial last line"):
        records = read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2, 3]
    with pytest.warns(UserWarning):
        truncate_metrics(str(path), 2)
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    assert open(path).read().endswith("}\n")


def test_an_invalid_line_inside_the_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(str(path))


def test_truncate_metrics_without_a_file_does_nothing(tmp_path):
    truncate_metrics(str(tmp_path / "metrics.jsonl"), 3)
    assert not (tmp_path / "metrics.jsonl").exists()


def feed(health, values, start=1):
    return [bool(health.update(step, torch.tensor(loss), torch.tensor(norm)))
            for step, (loss, norm) in enumerate(values, start=start)]


def test_consecutive_non_finite_steps_stop_the_run_and_are_flagged_for_skipping():
    health = TrainingHealth(max_nonfinite_steps=3)
    ok = feed(health, [(0.69, 1.0), (math.nan, math.nan), (0.6, 1.0), (math.inf, 2.0)])
    assert ok == [True, False, True, False]
    report = health.read()
    assert report.stop_message is None and report.nonfinite_steps == 2
    assert len(report.warnings) == 1 and "first at step 2" in report.warnings[0]
    assert health.read().warnings == []  # nothing new
    feed(health, [(math.nan, 1.0), (0.5, math.nan)], start=5)
    report = health.read()
    assert report.stop_message.startswith("stopped at step 6: 3 consecutive steps")
    assert "lower the learning rate" in report.stop_message


def test_a_dead_gradient_and_a_loss_explosion_are_reported_once():
    health = TrainingHealth(zero_grad_steps=4, loss_jump=100.0)
    feed(health, [(0.69, 1.0), (0.68, 0.9), (8.1e6, 3e4)] + [(0.69, 0.0)] * 6)
    report = health.read()
    assert report.stop_message is None
    assert any(w.startswith("step 3: the loss jumped to 8.1e+06") for w in report.warnings), report.warnings
    assert any(w.startswith("step 7: the gradient norm has been exactly 0 for 4 steps") for w in report.warnings)
    assert health.read().warnings == []


def test_a_healthy_run_reports_nothing():
    health = TrainingHealth()
    feed(health, [(0.69 * 0.97 ** k, 1.0 / (k + 1)) for k in range(50)])
    report = health.read()
    assert report.warnings == [] and report.stop_message is None and report.steps == 50


def test_update_never_reads_the_device():
    # Meta tensors have no data: any host read (item, bool, tolist) raises. update must queue kernels only.
    health = TrainingHealth(device="meta")
    finite = health.update(1, torch.tensor(0.5, device="meta"), torch.tensor(1.0, device="meta"))
    assert finite.device.type == "meta" and finite.dtype == torch.bool


def test_metrics_file_lines_are_json(tmp_path):
    path = write_log(tmp_path, [1])
    assert json.loads(open(path).read()) == {"step": 1, "loss": 0.5}
