"""Data-parallel DPOTrainer: 2 CPU processes on gloo against 1 process with the same global batch.

Both data-parallel modes run in the same two processes (one spawn, it dominates the time): replicated
parameters with all-reduced gradients, and FSDP2 (`fully_shard`, config.fsdp=True), whose sharded
gradients are gathered with `full_tensor()` for the comparison.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import SPLIT_RTOL, assert_grads_close, make_config, random_pairs, tiny_model  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.training import checkpoint as ckpt  # noqa: E402
from dpo_fast.training.metrics import read_metrics  # noqa: E402
from dpo_fast.training.trainer import DistributedTimeout, DPOTrainer  # noqa: E402

# Global batch 4: step 1 has 4 pairs (2 per rank); step 2 has 1, so rank 1 has nothing to do: it reduces zero
# gradients (replicated) or runs a zero-weight filler micro-batch (FSDP, whose collectives need every rank).
NUM_PAIRS = 5


def _full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # a collective under FSDP
            out[name] = g.detach().clone()
    return out


def _two_steps(trainer: DPOTrainer) -> list[dict]:
    """Gradients and statistics of the first two steps (the optimizer applied in between).

    SGD, not Adam: Adam's first step is about lr * sign(g), so round-off-sized differences in near-zero
    gradient entries would become lr-sized weight differences before step 2.
    """
    results = []
    for step in range(2):
        stats = trainer.compute_gradients(trainer.step_micro_batches(0, step))
        results.append({"stats": stats, "grads": _full_grads(trainer.model)})
        trainer.optimizer_step()
    return results


def _setup(tmp, per_device: int, name: str, **kw):
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    kw = {"max_steps": 2, "save_steps": 1, **kw}
    config = make_config(tmp / name, per_device_train_batch_size=per_device, layout="packed", optim="sgd", **kw)
    return DPOTrainer(tiny_model(vocab, 0), tokenizer, random_pairs(NUM_PAIRS, vocab, seed=21),
                      ref_model=tiny_model(vocab, 1), config=config)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    tmp = Path(tmp)
    try:
        trainer = _setup(tmp, 2, "manual")
        assert trainer.world_size == world and trainer.rank == rank
        torch.save(_two_steps(trainer), tmp / f"rank{rank}.pt")
        _setup(tmp, 2, "train").train()  # the loop itself: checkpoints with barriers, metrics on rank 0
        fsdp = _setup(tmp, 2, "fsdp", fsdp=True)
        torch.save(_two_steps(fsdp), tmp / f"fsdp_rank{rank}.pt")
        _setup(tmp, 2, "fsdp_train", fsdp=True, precompute_ref=True).train()
        # Periodic saves by minutes: rank 0's clock, agreed with the step after (flags reduced with the statistics).
        _setup(tmp, 2, "minutes", max_steps=4, save_steps=0, save_minutes=1e-9).train()
        # SIGTERM reaching rank 1 only, during step 2 (after that step's flags were taken): step 3 carries it in its
        # reduced flags, read after step 4, so both ranks stop after step 4 with one checkpoint.
        stopped = _setup(tmp, 2, "sigterm", max_steps=6, save_steps=0)
        real_step = stopped.optimizer_step

        def step():
            if rank == 1 and stopped.global_step + 1 == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step()

        stopped.optimizer_step = step
        try:
            stopped.train()
        except ckpt.TrainingInterrupted as e:
            (tmp / f"stopped{rank}.txt").write_text(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers in each).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single = _two_steps(_setup(tmp_path, 4, "single"))
    assert single[1]["stats"]["pairs"] == NUM_PAIRS - 4
    for mode in ("rank", "fsdp_rank"):
        rank0, rank1 = (torch.load(tmp_path / f"{mode}{r}.pt") for r in range(2))
        for step in range(2):
            what = f"{mode[:-5] or 'all-reduce'} step {step + 1}"
            # Every rank holds the same global gradient.
            assert_grads_close(rank1[step]["grads"], rank0[step]["grads"], 0.0, f"{what}: rank 1 vs rank 0")
            assert_grads_close(rank0[step]["grads"], single[step]["grads"], SPLIT_RTOL, f"{what}: 2 ranks vs 1")
            for key, value in single[step]["stats"].items():
                assert rank0[step]["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (what, key)

    out = str(tmp_path / "train" / "run")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    assert sorted(f for f in os.listdir(os.path.join(out, "checkpoint-2")) if f.startswith("rng_state")) == \
        ["rng_state_0.pt", "rng_state_1.pt"]
    assert ckpt.read_trainer_state(os.path.join(out, "checkpoint-2"))["world_size"] == 2
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(single[0]["stats"]["loss"] / 4, rel=1e-5)
    fsdp_out = tmp_path / "fsdp_train" / "run"
    assert [r["step"] for r in read_metrics(str(fsdp_out / "metrics.jsonl"))] == [1, 2]
    assert records[0]["loss"] == pytest.approx(read_metrics(str(fsdp_out / "metrics.jsonl"))[0]["loss"], rel=1e-5)
    assert os.path.isfile(fsdp_out / "checkpoint-2" / "optimizer_rank1.pt")
    # FSDP's export gathers the full weights: the same model as the replicated run's (its reference
    # log-probs were precomputed, hence round-off differences only).
    fsdp_final = ckpt.load_safetensors_dir(str(fsdp_out / "final"))
    replicated_final = ckpt.load_safetensors_dir(os.path.join(out, "final"))
    assert fsdp_final.keys() == replicated_final.keys()
    assert_grads_close(fsdp_final, replicated_final, SPLIT_RTOL, "FSDP final weights vs replicated")

    minutes = str(tmp_path / "minutes" / "run")
    assert [s for s, _ in ckpt.list_checkpoints(minutes)] == [4]  # saved after 2 and 4, the second replacing the first
    stopped = [(tmp_path / f"stopped{r}.txt").read_text() for r in range(2)]
    sigterm = str(tmp_path / "sigterm" / "run")
    assert stopped[0].startswith("stopped by SIGTERM after step 4: checkpoint saved in ")
    assert stopped[1].startswith("stopped by SIGTERM after step 4: ")
    assert [s for s, _ in ckpt.list_checkpoints(sigterm)] == [4]


def _frozen_rank_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    trainer = _setup(Path(tmp), 2, "frozen", ddp_timeout=3)  # a margin for a loaded machine before train()
    if rank == 1:  # frozen: never reaches the first collective of train(); gone once rank 0 has reported
        deadline = time.monotonic() + 20
        while not (Path(tmp) / "timeout.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    try:
        trainer.train()
    except DistributedTimeout as e:
        ckpt.atomic_write_bytes(str(Path(tmp) / "timeout.txt"), str(e).encode())
    os._exit(0)  # a timed-out process group cannot be torn down cleanly


def test_a_frozen_rank_is_an_error_naming_the_rank_after_ddp_timeout(tmp_path):
    start = time.monotonic()
    mp.start_processes(_frozen_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    message = (tmp_path / "timeout.txt").read_text()
    assert message.startswith("rank 0 of 2: a collective waited more than ddp_timeout=3 s at step 1: "), message
    assert time.monotonic() - start < 30


def _failed_save_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import errno
    from datetime import timedelta
    from pathlib import Path

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))

    def any_failed(failed: bool) -> bool:
        flag = torch.tensor([float(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_model(directory: str) -> None:  # only rank 0 writes the model: its disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        ckpt.save_checkpoint(tmp, 3, save_model=save_model, optimizer_state={}, scheduler_state={},
                             trainer_state={}, rank=rank, world_size=world, failed_anywhere=any_failed)
    except ckpt.CheckpointWriteError as e:
        (Path(tmp) / f"error{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_a_save_that_fails_on_one_rank_fails_on_every_rank_at_once(tmp_path):
    """Rank 0's disk fills while it writes the model: both ranks raise CheckpointWriteError within seconds
    (rank 1 used to wait at the next barrier until the process group's timeout), nothing is left behind."""
    start = time.monotonic()
    mp.start_processes(_failed_save_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    assert time.monotonic() - start < 15
    assert "no space left on device" in (tmp_path / "error0.txt").read_text().lower()
    assert "another process could not write its part" in (tmp_path / "error1.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error0.txt", "error1.txt"]
