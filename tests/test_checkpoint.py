"""Checkpoints: manifest validation and fallback, lineage, run-settings comparison, failed writes, tokenizer."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.training import checkpoint as ckpt  # noqa: E402
from dpo_fast.training.config import DPOConfig  # noqa: E402


def save(output_dir, step, *, lineage=None, tokenizer=None, config=None):
    weights = {"w": torch.full((3, 5), float(step))}
    state = {"epoch": 0, "step_in_epoch": step, "config": (config or DPOConfig()).to_dict()}
    if lineage is not None:
        state["lineage"] = lineage
    return ckpt.save_checkpoint(
        str(output_dir), step, save_model=lambda d: save_file(weights, os.path.join(d, "model.safetensors")),
        optimizer_state={"state": {}, "param_groups": []}, scheduler_state={"last_epoch": step},
        trainer_state=state, tokenizer=tokenizer)


def test_manifest_records_every_file_and_a_clean_checkpoint_validates(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads(open(os.path.join(path, ckpt.MANIFEST_FILE)).read())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt",
                                      ckpt.STATE_FILE}
    for name, entry in manifest["files"].items():
        assert entry["size"] == os.path.getsize(os.path.join(path, name))
        assert entry["crc32"] == ckpt.file_checksum(os.path.join(path, name))
    assert ckpt.validate_checkpoint(path) == []


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _scramble_same_size(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(os.path.join(p, "model.safetensors")), "model.safetensors has"),
    (lambda p: os.unlink(os.path.join(p, "scheduler.pt")), "scheduler.pt is missing"),
    (lambda p: os.unlink(os.path.join(p, "optimizer.pt")), "optimizer.pt is missing"),
    (lambda p: _scramble_same_size(os.path.join(p, "model.safetensors")), "does not match its checksum"),
    (lambda p: open(os.path.join(p, ckpt.STATE_FILE), "w").write("{garbage"), "not valid JSON"),
])
def test_latest_skips_an_invalid_checkpoint_and_an_explicit_one_is_a_one_line_error(tmp_path, damage, message):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    damage(newest)
    assert any(message in p for p in ckpt.validate_checkpoint(newest))
    warned = []
    assert ckpt.resolve_resume_path("latest", str(tmp_path), warn=warned.append).endswith("checkpoint-1")
    assert len(warned) == 1 and "checkpoint-2" in warned[0] and message in warned[0]
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        ckpt.resolve_resume_path(newest, str(tmp_path))
    assert "\n" not in str(info.value)


def test_latest_with_no_usable_checkpoint_says_so(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFound, match="holds no valid checkpoint"):
        ckpt.resolve_resume_path("latest", str(tmp_path / "empty"))
    only = save(tmp_path, 3)
    os.unlink(os.path.join(only, "scheduler.pt"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3 invalid"):
        ckpt.resolve_resume_path("latest", str(tmp_path), warn=lambda m: None)


def test_a_checkpoint_without_manifest_is_checked_for_the_files_resume_needs(tmp_path):
    path = save(tmp_path, 1)
    os.unlink(os.path.join(path, ckpt.MANIFEST_FILE))
    assert ckpt.validate_checkpoint(path) == []
    os.unlink(os.path.join(path, "rng_state_0.pt"))
    assert ckpt.validate_checkpoint(path) == ["rng_state_0.pt is missing"]


def test_latest_follows_the_newest_run_after_a_rollback(tmp_path):
    first = ckpt.start_lineage(str(tmp_path))
    assert first["run_index"] == 0 and first["resumed_from"] is None
    for step in (1, 2, 3):
        save(tmp_path, step, lineage=first)
    # Roll back to checkpoint-1; the new run writes checkpoint-2 again, then crashes.
    second = ckpt.start_lineage(str(tmp_path), resumed_from=str(tmp_path / "checkpoint-1"))
    assert second["run_index"] == 1
    assert second["resumed_from"] == {"checkpoint": "checkpoint-1", "step": 1, "run_id": first["run_id"]}
    save(tmp_path, 2, lineage=second)
    # checkpoint-3 has the larger step but belongs to the abandoned run.
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    assert ckpt.resolve_resume_path("latest", str(tmp_path)).endswith("checkpoint-2")


def test_archive_abandoned_moves_later_checkpoints_out_of_reach(tmp_path):
    lineage = ckpt.start_lineage(str(tmp_path))
    for step in (1, 2, 3):
        save(tmp_path, step, lineage=lineage)
    moved = ckpt.archive_abandoned(str(tmp_path), str(tmp_path / "checkpoint-1"))
    assert sorted(os.path.basename(p) for p in moved) == [f"checkpoint-{s}-{lineage['run_id'][:8]}" for s in (2, 3)]
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1]
    assert all(ckpt.validate_checkpoint(p) == [] for p in moved)


def test_a_failed_write_removes_the_temporary_directory_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith("scheduler.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="checkpoint-2 .*no space left on device") as info:
        save(tmp_path, 2)
    assert str(tmp_path) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    assert ckpt.resolve_resume_path("latest", str(tmp_path)).endswith("checkpoint-1")


def test_a_torch_stream_error_on_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    def stream_error(obj, path, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ckpt.torch, "save", stream_error)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    with pytest.raises(ckpt.CheckpointWriteError, match="no space left on device"):
        save(tmp_path, 1)
    assert os.listdir(tmp_path) == []


def test_check_writable_dir_names_the_path(tmp_path):
    ckpt.check_writable_dir(str(tmp_path / "new" / "run"))
    assert os.path.isdir(tmp_path / "new" / "run") and os.listdir(tmp_path / "new" / "run") == []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ckpt.CheckpointWriteError, match=r"output_dir .*a-file/run' is not writable"):
        ckpt.check_writable_dir(str(blocker / "run"))


def test_checkpoints_carry_the_tokenizer_and_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = make_tokenizer()
    path = save(tmp_path, 1, tokenizer=tokenizer)
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert ckpt.validate_checkpoint(path) == []  # the tokenizer files are in the manifest too


def settings(config=None, **kw):
    options = dict(world_size=1, layout="prefix_shared", num_train_pairs=40, data_fingerprint="abc")
    options.update(kw)
    return ckpt.run_settings(config or DPOConfig(), **options)


def test_resume_refuses_a_changed_run_naming_each_setting():
    saved = settings()
    changed = settings(DPOConfig(per_device_train_batch_size=8, beta=0.2, loss_type="hinge", seed=1,
                                 max_length=512), data_fingerprint="other")
    check = ckpt.compare_run_settings(saved, changed)
    text = "; ".join(check.refusals)
    for name in ("per_device_train_batch_size: checkpoint 4, now 8", "global_batch: checkpoint 4, now 8",
                 "beta: checkpoint 0.1, now 0.2", "loss_type: checkpoint 'sigmoid', now 'hinge'", "seed:",
                 "max_length:", "tokenized training data differs"):
        assert name in text, text
    assert check.warnings == []
    with pytest.raises(ckpt.CheckpointError, match="per_device_train_batch_size") as info:
        ckpt.check_resume("out/checkpoint-4", {"run_settings": saved}, changed)
    assert "\n" not in str(info.value)


def test_resume_warns_about_settings_the_saved_state_overrides_or_that_apply_later():
    saved = settings()
    current = settings(DPOConfig(learning_rate=1e-4, logging_steps=5, save_steps=7))
    check = ckpt.compare_run_settings(saved, current)
    assert check.refusals == []
    text = "; ".join(check.warnings)
    assert "learning_rate: checkpoint 5e-07, now 0.0001: ignored, the saved optimizer and scheduler state keep 5e-07" \
        in text
    assert "logging_steps: checkpoint 10, now 5" in text and "save_steps: checkpoint 0, now 7" in text
    assert ckpt.compare_run_settings(saved, settings()) == ckpt.ResumeCheck([], [])


def test_resume_compares_against_the_config_older_checkpoints_saved():
    legacy = {"config": DPOConfig().to_dict(), "world_size": 1, "num_train_pairs": 40, "global_step": 3}
    warnings = ckpt.check_resume("c", legacy, settings(DPOConfig(learning_rate=1e-5)))
    assert len(warnings) == 1 and "learning_rate" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="num_train_pairs: checkpoint 40, now 41"):
        ckpt.check_resume("c", legacy, settings(num_train_pairs=41))
    with pytest.raises(ckpt.CheckpointError, match="world_size: checkpoint 1, now 2"):
        ckpt.check_resume("c", legacy, settings(world_size=2))


def test_resume_message():
    state = {"global_step": 12, "epoch": 1}
    assert ckpt.resume_message("/runs/x/checkpoint-12/", state) == "resumed from checkpoint-12 (step 12, epoch 1)"


def test_save_schedule_by_steps_and_by_minutes():
    now = [0.0]
    by_steps = ckpt.SaveSchedule(every_steps=3, clock=lambda: now[0])
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = ckpt.SaveSchedule(every_minutes=2, clock=lambda: now[0])
    now[0] = 119.0
    assert not by_time.due(1)
    now[0] = 120.0
    assert by_time.due(2)
    by_time.saved()
    now[0] = 200.0
    assert not by_time.due(3)
    assert not ckpt.SaveSchedule(clock=lambda: now[0]).due(4)


def test_stop_request_turns_sigterm_into_a_flag_and_restores_the_handler():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with ckpt.StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
    with ckpt.StopRequest() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C interrupts at once
    assert "--resume-from-checkpoint latest" in ckpt.stop_message("SIGTERM", 7, "out/checkpoint-7")


def test_rng_states_round_trip_through_weights_only_loading(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state
    path = save(tmp_path, 1)
    want = (random.random(), float(np.random.standard_normal()), np.random.rand(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.load_rng_state(path, 0)  # loads with weights_only=True
    got = (random.random(), float(np.random.standard_normal()), np.random.rand(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    torch.save({"numpy": np.zeros(3)}, os.path.join(path, "rng_state_0.pt"))  # an older version's pickle
    with pytest.raises(ckpt.CheckpointError, match="does not load with weights_only=True"):
        ckpt.load_rng_state(path, 0)


def test_write_directory_replaces_whole_or_not_at_all(tmp_path):
    final = str(tmp_path / "final")
    ckpt.write_directory(final, lambda d: open(os.path.join(d, "a.txt"), "w").write("one"),
                         tokenizer=make_tokenizer())
    assert open(os.path.join(final, "a.txt")).read() == "one"
    assert os.path.isfile(os.path.join(final, "tokenizer_config.json"))

    def full_disk(d):
        open(os.path.join(d, "a.txt"), "w").write("two")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(ckpt.CheckpointWriteError, match=r"final.: no space left on device; its previous contents"):
        ckpt.write_directory(final, full_disk)
    assert sorted(os.listdir(tmp_path)) == ["final"]  # no temporary directory left holding the space
    assert open(os.path.join(final, "a.txt")).read() == "one"


def test_save_total_limit_never_removes_the_checkpoint_just_written(tmp_path):
    first = ckpt.start_lineage(str(tmp_path))
    for step in (1, 2, 3):
        save(tmp_path, step, lineage=first)
    second = ckpt.start_lineage(str(tmp_path), resumed_from=str(tmp_path / "checkpoint-1"))
    ckpt.save_checkpoint(str(tmp_path), 2, save_model=lambda d: save_file({"w": torch.ones(2)},
                                                                          os.path.join(d, "model.safetensors")),
                         optimizer_state={}, scheduler_state={}, trainer_state={"lineage": second},
                         save_total_limit=1)
    # By step, checkpoint-3 of the abandoned run would be kept and the checkpoint just written removed.
    assert [os.path.basename(p) for p in ckpt.checkpoints_newest_first(str(tmp_path))] == ["checkpoint-2"]
    assert ckpt.read_trainer_state(str(tmp_path / "checkpoint-2"))["lineage"]["run_id"] == second["run_id"]
