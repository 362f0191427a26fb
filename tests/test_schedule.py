"""Which schedule `linear_dpo_loss` runs (`dpo_fast.loss.ops.schedule.linear_loss_schedule`, a pure function),
and that the public function follows it."""

from __future__ import annotations

import pytest
import torch

from dpo_fast.loss import ops
from dpo_fast.loss.formulas import LOSS_TYPES, PAIR_SEPARABLE, LossConfig
from dpo_fast.loss.functional import _FlatHidden
from dpo_fast.loss.ops import schedule
from dpo_fast.loss.ops.schedule import (
    TORCH_ONE_PASS,
    TORCH_RECOMPUTE,
    TRITON_ONE_PASS,
    TRITON_TWO_PASS,
    linear_loss_schedule,
)
from tests.test_one_pass import IGNORE, LOSS_KWARGS, _case

# A GPU batch: 8 pairs of 2 x 1024 scored tokens, Llama-3's head.
GPU = dict(pair_separable=True, one_buffer=True, dtype=torch.bfloat16, one_dtype=True, num_pairs=8,
           scored_tokens=16384, largest_pair_tokens=2048, hidden_size=4096, vocab_size=128256)
# The CPU benchmark's batch: 4 pairs of 2 x 512 tokens, H=512, V=32000.
CPU = dict(GPU, dtype=torch.float32, num_pairs=4, scored_tokens=4096, largest_pair_tokens=1024, hidden_size=512,
           vocab_size=32000)


def test_triton_pair_separable_bf16_and_fp32_run_one_pass():
    assert linear_loss_schedule("triton", **GPU) == TRITON_ONE_PASS
    assert linear_loss_schedule("triton", **dict(GPU, dtype=torch.float32, largest_pair_tokens=1024)) \
        == TRITON_ONE_PASS
    # Short pairs too: on the GPU there is no per-pair [V, H] fold to amortise.
    assert linear_loss_schedule("triton", **dict(GPU, scored_tokens=64, largest_pair_tokens=8)) == TRITON_ONE_PASS


@pytest.mark.parametrize("change", [
    dict(pair_separable=False),  # aot, aot_unpaired: the batch's coefficients need every pair first
    dict(dtype=torch.float16),  # dweight summed in fp16 would overflow
    dict(one_dtype=False),  # a bias in another dtype than the head
    dict(largest_pair_tokens=2 * 2048 + 1),  # one pair's bf16 logits past the 512 MiB budget
])
def test_triton_everything_else_runs_two_pass(change):
    assert linear_loss_schedule("triton", **dict(GPU, **change)) == TRITON_TWO_PASS


def test_triton_budget_boundary(monkeypatch):
    fits = GPU["largest_pair_tokens"] * GPU["vocab_size"] * 2
    monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", fits)
    assert linear_loss_schedule("triton", **GPU) == TRITON_ONE_PASS
    monkeypatch.setattr(schedule, "LOGITS_BUDGET_BYTES", fits - 1)
    assert linear_loss_schedule("triton", **GPU) == TRITON_TWO_PASS


def test_torch_rule_is_the_measured_table():
    assert linear_loss_schedule("torch", **CPU) == TORCH_ONE_PASS
    assert linear_loss_schedule("torch", **dict(CPU, pair_separable=False)) == TORCH_RECOMPUTE
    # One buffer from 64 scored tokens per pair, two buffers from 128.
    assert linear_loss_schedule("torch", **dict(CPU, num_pairs=64, scored_tokens=64 * 64)) == TORCH_ONE_PASS
    assert linear_loss_schedule("torch", **dict(CPU, num_pairs=64, scored_tokens=64 * 64 - 1)) == TORCH_RECOMPUTE
    two = dict(CPU, one_buffer=False, num_pairs=32)
    assert linear_loss_schedule("torch", **dict(two, scored_tokens=128 * 32)) == TORCH_ONE_PASS
    assert linear_loss_schedule("torch", **dict(two, scored_tokens=128 * 32 - 1)) == TORCH_RECOMPUTE
    # Fewer scored tokens than H: the [V, H] scratch would outgrow the logits it avoids.
    assert linear_loss_schedule("torch", **dict(CPU, num_pairs=1, scored_tokens=511)) == TORCH_RECOMPUTE
    # fp16 and mixed dtypes change nothing on the torch backend (its tiles are float32).
    assert linear_loss_schedule("torch", **dict(CPU, dtype=torch.float16, one_dtype=False)) == TORCH_ONE_PASS


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch', got 'cuda'"):
        linear_loss_schedule("cuda", **GPU)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_batch_sizes_reach_the_rule(monkeypatch, loss_type):
    """`ops.linear_loss_schedule_for` measures what the rule reads: scored tokens per pair, dtypes."""
    hidden, weight, bias, labels, *_ = _case(50, "sigmoid", torch.float32)
    flat = _FlatHidden(hidden, labels, None, IGNORE, weight.shape[0])
    seen = {}
    monkeypatch.setattr(schedule, "linear_loss_schedule", lambda backend, **kw: seen.update(kw) or "picked")
    config = LossConfig(beta=0.1, loss_type=loss_type, **LOSS_KWARGS.get(loss_type, {}))
    assert ops.linear_loss_schedule_for(config, flat, weight, bias.double(), backend="triton") == "picked"
    assert seen["pair_separable"] == (loss_type in PAIR_SEPARABLE)
    assert seen["one_dtype"] is False and seen["dtype"] == torch.float32
    assert (seen["hidden_size"], seen["vocab_size"], seen["num_pairs"]) == (13, 41, 3)
    if loss_type in PAIR_SEPARABLE:
        per_pair = [int(((labels[i] != IGNORE).sum() + (labels[3 + i] != IGNORE).sum())) for i in range(3)]
        assert seen["scored_tokens"] == sum(per_pair) and seen["largest_pair_tokens"] == max(per_pair)
