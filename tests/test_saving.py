"""A DPOTrainer run's checkpoints and resume (`dpo_fast.training.saving`): a fresh run clears the previous
one, a resume continues exactly like an uninterrupted run (full weights and LoRA), and no checkpoint holds
non-finite weights."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import make_config, random_pairs, tiny_model  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.training import checkpoint as ckpt  # noqa: E402
from dpo_fast.training import saving  # noqa: E402
from dpo_fast.training.metrics import METRICS_FILE, TrainingDiverged, read_metrics  # noqa: E402
from dpo_fast.training.trainer import DPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_a_fresh_run_clears_the_previous_runs_metrics_and_checkpoints(tmp_path):
    config = make_config(tmp_path, overwrite_output_dir=True)
    out = config.output_dir
    for step in (1, 2):
        ckpt.save_checkpoint(out, step, save_model=lambda d: None, optimizer_state={}, scheduler_state={},
                             trainer_state={"epoch": 0, "step_in_epoch": step})
    with open(os.path.join(out, METRICS_FILE), "w") as f:
        f.write('{"step": 1}\n')
    calls = []
    lineage, path, state = saving.start_run(config, {}, rank=0, barrier=lambda: calls.append("barrier"))
    assert (path, state) == (None, None) and calls == ["barrier"]
    assert ckpt.list_checkpoints(out) == [] and not os.path.exists(os.path.join(out, METRICS_FILE))
    # Cleared first, so the new run is the first of its output_dir.
    assert lineage["run_index"] == 0 and lineage["resumed_from"] is None


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(3, 2)
    saving.check_weights_finite(model, 5, distributed=False, device=torch.device("cpu"))
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(TrainingDiverged, match="^stopped at step 5: the weights hold NaN or infinite values"):
        saving.check_weights_finite(model, 5, distributed=False, device=torch.device("cpu"))
    model.weight.requires_grad_(False)  # frozen weights are not the run's to check
    saving.check_weights_finite(model, 5, distributed=False, device=torch.device("cpu"))


def _run(tmp_path, tokenizer, pairs, crash_at_step=None, **kw):
    kw = {"max_steps": 4, "save_steps": 2, **kw}
    config = make_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.3,
                         weight_decay=0.01, **kw)
    trainer = DPOTrainer(tiny_model(len(tokenizer)), tokenizer, pairs, config=config)
    if crash_at_step is not None:
        real_step = trainer.optimizer_step

        def step():
            if trainer.global_step + 1 == crash_at_step:
                raise KeyboardInterrupt("simulated crash")
            return real_step()

        trainer.optimizer_step = step
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        return trainer
    trainer.train()
    return trainer


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, tokenizer):
    pairs = random_pairs(7, len(tokenizer), seed=11)  # 2 steps per epoch, the second short: resume crosses an epoch
    full = _run(tmp_path / "full", tokenizer, pairs)
    _run(tmp_path / "resumed", tokenizer, pairs, crash_at_step=4)  # logged 1..3, saved checkpoint-2
    out = tmp_path / "resumed" / "run"
    assert ckpt.latest_checkpoint(str(out)).endswith("checkpoint-2")
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3]
    resumed = _run(tmp_path / "resumed", tokenizer, pairs, resume_from_checkpoint="latest")
    want = read_metrics(str(tmp_path / "full" / "run" / "metrics.jsonl"))
    got = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for w, g in zip(want, got):
        for key in ("loss", "rewards/margins", "grad_norm", "lr"):
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_save_total_limit_and_resume_errors(tmp_path, tokenizer):
    pairs = random_pairs(4, len(tokenizer), seed=12)
    _run(tmp_path, tokenizer, pairs, max_steps=3, save_steps=1, save_total_limit=2)
    out = str(tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume_path(str(tmp_path / "nowhere"), out)
    with pytest.raises(ckpt.CheckpointError, match="num_train_pairs: checkpoint 4, now 3"):
        DPOTrainer(tiny_model(len(tokenizer)), tokenizer, pairs[:3],
                   config=make_config(tmp_path, max_steps=3, resume_from_checkpoint="latest")).train()


def test_lora_resume_matches_an_uninterrupted_run(tmp_path, tokenizer):
    pytest.importorskip("peft")
    pairs = random_pairs(6, len(tokenizer), seed=15)
    lora = dict(lora_r=2, learning_rate=1e-2, max_steps=3, save_steps=1)
    full = _run(tmp_path / "full", tokenizer, pairs, **lora)
    _run(tmp_path / "resumed", tokenizer, pairs, crash_at_step=3, **lora)
    resumed = _run(tmp_path / "resumed", tokenizer, pairs, resume_from_checkpoint="latest", **lora)
    want = read_metrics(str(tmp_path / "full" / "run" / "metrics.jsonl"))
    got = read_metrics(str(tmp_path / "resumed" / "run" / "metrics.jsonl"))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
