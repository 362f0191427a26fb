"""The micro-batch plan (`dpo_fast.training.plan`): every pair once per epoch, token budgets kept, steps
that cut the plan in order, and each rank's share of a step."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import make_config, random_pairs, tiny_model  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.data.layouts import pair_cost  # noqa: E402
from dpo_fast.training import plan  # noqa: E402
from dpo_fast.training.trainer import DPOTrainer  # noqa: E402


@pytest.mark.parametrize("size", [1, 3, 4])
def test_pair_batches_cover_each_pair_once_in_the_epochs_order(tmp_path, size):
    pairs = random_pairs(10, 50, seed=1)
    config = make_config(tmp_path, per_device_train_batch_size=size, seed=7)
    epoch0 = plan.epoch_plan(pairs, config, "padded", 1, 0)
    assert [i for m in epoch0 for i in m] == plan.epoch_order(10, 7, 0)
    assert all(len(m) == size for m in epoch0[:-1]) and 0 < len(epoch0[-1]) <= size
    assert epoch0 == plan.epoch_plan(pairs, config, "padded", 1, 0)  # seeded: the same on every rank
    assert [i for m in plan.epoch_plan(pairs, config, "padded", 1, 1) for i in m] != [i for m in epoch0 for i in m]


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_token_batches_keep_the_budget_and_cover_each_pair_once(tmp_path, layout):
    pairs = random_pairs(23, 50, seed=4)
    config = make_config(tmp_path, layout=layout, max_tokens_per_batch=90)
    epoch = plan.epoch_plan(pairs, config, layout, 2, 0)
    assert sorted(i for m in epoch for i in m) == list(range(23))
    for m in epoch:
        assert sum(pair_cost(pairs[i], layout) for i in m) <= 90
    per_step = plan.micro_batches_per_step(config, 2)
    steps = [plan.step_micro_batches(epoch, s, per_step) for s in range(-(-len(epoch) // per_step))]
    assert [m for step in steps for m in step] == epoch


def test_token_budget_batches_cover_each_pair_once_per_epoch(tmp_path):
    # The trainer runs the plan: its epochs and steps are the plan's.
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    pairs = random_pairs(11, vocab, seed=9)
    trainer = DPOTrainer(tiny_model(vocab), tokenizer, pairs,
                         config=make_config(tmp_path, layout="packed", max_tokens_per_batch=80,
                                            gradient_accumulation_steps=2))
    epoch = trainer.epoch_plan(0)
    assert epoch == plan.epoch_plan(pairs, trainer.config, "packed", 1, 0)
    assert sorted(i for m in epoch for i in m) == list(range(11))
    for m in epoch:
        assert sum(pairs[i].num_tokens_padded for i in m) <= 80
    steps = [trainer.step_micro_batches(0, s) for s in range(trainer.steps_per_epoch)]
    assert [m for step in steps for m in step] == epoch


def test_each_rank_runs_every_world_size_th_micro_batch_with_its_share():
    step = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10]]
    shares = {rank: plan.rank_micro_batches(step, rank, 2) for rank in range(2)}
    assert [m for m, _ in shares[0]] == [[0, 1, 2], [4, 5], [10]]
    assert [m for m, _ in shares[1]] == [[3], [6, 7, 8, 9]]
    assert sum(w for rank in shares.values() for _, w in rank) == pytest.approx(1.0)
    assert [w for _, w in shares[1]] == [pytest.approx(1 / 11), pytest.approx(4 / 11)]
    # FSDP: every rank runs as many micro-batches; the extra one weighs nothing.
    padded = plan.rank_micro_batches(step, 1, 2, same_count=True)
    assert len(padded) == 3 and padded[2] == ([0, 1, 2], 0.0)
