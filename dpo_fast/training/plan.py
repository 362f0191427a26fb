"""The micro-batch plan of a run: which pairs each micro-batch of an epoch holds, which micro-batches make
an optimizer step, and which of a step's micro-batches a rank runs. Pure functions of the pairs, the config
and the epoch (seeded by seed + epoch), so every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..data.layouts import pair_cost
from ..data.packing import pack
from ..data.pairs import TokenizedPair
from .config import DPOConfig


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of the pair indices."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_pairs, generator=g).tolist()


def epoch_plan(pairs: Sequence[TokenizedPair], config: DPOConfig, layout: str, world_size: int,
               epoch: int) -> list[list[int]]:
    """All micro-batches of an epoch, in order, as lists of indices into `pairs` (same on every rank).

    Pair batching: the epoch's permutation cut into per_device_train_batch_size pairs. Token batching
    (max_tokens_per_batch > 0): the permutation packed into bins of that many tokens by
    `dpo_fast.data.packing.pack`, ordered so that each run of world_size bins carries near-equal tokens.
    """
    order = epoch_order(len(pairs), config.seed, epoch)
    if config.max_tokens_per_batch:
        costs = [pair_cost(pairs[i], layout) for i in order]
        bins = pack(costs, config.max_tokens_per_batch, world_size=world_size, seed=config.seed + epoch)
        return [[order[k] for k in sorted(b)] for b in bins]
    size = config.per_device_train_batch_size
    return [order[s:s + size] for s in range(0, len(order), size)]


def micro_batches_per_step(config: DPOConfig, world_size: int) -> int:
    return config.gradient_accumulation_steps * world_size


def step_micro_batches(plan: list[list[int]], step_in_epoch: int, per_step: int) -> list[list[int]]:
    """The step's micro-batches (all ranks'); micro-batch j is run by rank j % world_size."""
    return plan[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]


def rank_micro_batches(micro_batches: list[list[int]], rank: int, world_size: int, *,
                       same_count: bool = False) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a step: (pair indices, share of the step's pairs).

    same_count: every rank runs as many micro-batches (FSDP's collectives run inside forward and backward),
    a rank short of one repeats the step's first micro-batch with share 0.
    """
    total = sum(len(m) for m in micro_batches)
    mine = [(m, len(m) / total) for j, m in enumerate(micro_batches) if j % world_size == rank]
    if same_count:
        most = math.ceil(len(micro_batches) / world_size)
        mine += [(micro_batches[0], 0.0)] * (most - len(mine))
    return mine
