"""The reference model of a run (`dpo_fast.training.reference`): reference-free, a frozen model (given or a
frozen copy of the initial policy), the LoRA policy with its adapter disabled, and precomputed log-probs
cached on disk; through the trainer, against the float64 oracle where a loss is computed."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import (  # noqa: E402
    ORACLE_RTOL,
    SPLIT_RTOL,
    assert_grads_close,
    grads,
    make_config,
    oracle_gradients,
    random_pairs,
    tiny_model,
)
from tiny_tokenizer import make_tokenizer  # noqa: E402

from dpo_fast.training import reference  # noqa: E402
from dpo_fast.training.config import DPOConfig  # noqa: E402
from dpo_fast.training.metrics import read_metrics  # noqa: E402
from dpo_fast.training.trainer import DPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_reference_model_forms(tmp_path):
    policy = tiny_model(40, 0)
    given = tiny_model(40, 1)
    assert reference.reference_model(make_config(tmp_path, loss_type="simpo"), policy, None) is None
    assert reference.reference_model(make_config(tmp_path), policy, given) is given
    copied = reference.reference_model(make_config(tmp_path), policy, None)
    assert copied is not policy and not copied.training
    assert all(not p.requires_grad for p in copied.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # the policy itself is left trainable
    for (name, p), q in zip(policy.named_parameters(), copied.parameters()):
        assert torch.equal(p, q), name


def test_cache_key_follows_weights_pairs_and_settings(tmp_path):
    config = make_config(tmp_path, ref_cache_dir=str(tmp_path / "cache"))
    model, pairs = tiny_model(40, 0), random_pairs(5, 40, seed=1)
    path = reference.cache_path(config, model, pairs, layout="packed", bf16=False, adapter_disabled=False)
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert path == reference.cache_path(config, copy.deepcopy(model), list(pairs), layout="packed", bf16=False,
                                        adapter_disabled=False)
    others = [
        reference.cache_path(config, tiny_model(40, 1), pairs, layout="packed", bf16=False, adapter_disabled=False),
        reference.cache_path(config, model, pairs[:4], layout="packed", bf16=False, adapter_disabled=False),
        reference.cache_path(config, model, pairs, layout="padded", bf16=False, adapter_disabled=False),
        reference.cache_path(config, model, pairs, layout="packed", bf16=True, adapter_disabled=False),
        reference.cache_path(config, model, pairs, layout="packed", bf16=False, adapter_disabled=True),
        reference.cache_path(make_config(tmp_path, ref_cache_dir=str(tmp_path / "cache"), max_length=31), model,
                             pairs, layout="packed", bf16=False, adapter_disabled=False),
    ]
    assert len({path, *others}) == 1 + len(others)


def test_a_cache_for_another_number_of_pairs_is_not_read(tmp_path):
    path = str(tmp_path / "ref_logps-x.pt")
    assert reference.read_cache(path, 3) is None
    torch.save(torch.arange(6.0).reshape(3, 2), path)
    assert torch.equal(reference.read_cache(path, 3), torch.arange(6.0).reshape(3, 2))
    assert reference.read_cache(path, 4) is None


def test_gather_cached_takes_the_micro_batch_rows():
    cache = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    chosen, rejected = reference.gather_cached(cache, torch.tensor([2, 0]), torch.device("cpu"))
    assert chosen.tolist() == [4.0, 0.0] and rejected.tolist() == [5.0, 1.0]


def test_checkpointing_is_on_by_default_and_the_reference_does_not_recompute(tmp_path, tokenizer):
    assert DPOConfig().gradient_checkpointing
    vocab = len(tokenizer)
    trainer = DPOTrainer(tiny_model(vocab), tokenizer, random_pairs(2, vocab), config=make_config(tmp_path))
    trainer.compute_gradients([[0, 1]])
    assert trainer.model.is_gradient_checkpointing
    assert not trainer.ref_model.is_gradient_checkpointing


def test_reference_free_simpo_matches_oracle_and_keeps_no_reference(tmp_path, tokenizer):
    vocab = len(tokenizer)
    model = tiny_model(vocab)
    pairs = random_pairs(3, vocab, seed=2)
    expected, _ = oracle_gradients(model, None, pairs, loss_type="simpo", beta=2.0)
    trainer = DPOTrainer(model, tokenizer, pairs, config=make_config(tmp_path, loss_type="simpo", beta=2.0))
    trainer.compute_gradients([[0, 1, 2]])
    assert trainer.ref_model is None
    assert_grads_close(grads(trainer.model), expected, ORACLE_RTOL, "simpo vs float64 oracle")
    with pytest.raises(ValueError, match="reference-free"):
        DPOTrainer(tiny_model(vocab), tokenizer, pairs, ref_model=tiny_model(vocab),
                   config=make_config(tmp_path / "b", loss_type="simpo"))


def test_precomputed_reference_is_cached_reused_and_freed(tmp_path, tokenizer, monkeypatch):
    vocab = len(tokenizer)
    pairs = random_pairs(6, vocab, seed=4)
    ref = tiny_model(vocab, 7)
    cache = tmp_path / "cache"
    live = DPOTrainer(tiny_model(vocab), tokenizer, pairs, ref_model=copy.deepcopy(ref),
                      config=make_config(tmp_path / "a"))
    live.compute_gradients([[0, 1, 2], [3, 4, 5]])
    pre = DPOTrainer(tiny_model(vocab), tokenizer, pairs, ref_model=copy.deepcopy(ref),
                     config=make_config(tmp_path / "b", precompute_ref=True, ref_cache_dir=str(cache)))
    pre.compute_gradients([[0, 1, 2], [3, 4, 5]])
    assert pre.ref_model is None  # freed once its log-probs were computed
    assert_grads_close(grads(pre.model), grads(live.model), SPLIT_RTOL, "precomputed vs live reference")
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("ref_logps-")

    # Same weights and data: read back, not recomputed.
    def fail(*a, **k):
        raise AssertionError("the cached reference log-probs should have been reused")

    monkeypatch.setattr(reference, "pair_logps", fail)
    again = DPOTrainer(tiny_model(vocab), tokenizer, pairs, ref_model=copy.deepcopy(ref),
                       config=make_config(tmp_path / "c", precompute_ref=True, ref_cache_dir=str(cache)))
    again.compute_gradients([[0, 1, 2]])
    monkeypatch.undo()
    # Other weights or other data: another key.
    for other_ref, other_pairs in ((tiny_model(vocab, 8), pairs), (ref, random_pairs(6, vocab, seed=5))):
        t = DPOTrainer(tiny_model(vocab), tokenizer, other_pairs, ref_model=copy.deepcopy(other_ref),
                       config=make_config(tmp_path / "d", precompute_ref=True, ref_cache_dir=str(cache),
                                          overwrite_output_dir=True))
        t.compute_gradients([[0]])
    assert len(os.listdir(cache)) == 3


def test_default_reference_is_a_frozen_copy_of_the_initial_policy(tmp_path, tokenizer):
    vocab = len(tokenizer)
    model = tiny_model(vocab)
    pairs = random_pairs(4, vocab, seed=1)
    trainer = DPOTrainer(model, tokenizer, pairs, config=make_config(tmp_path, max_steps=2, learning_rate=1e-2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert trainer.ref_model is not model
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    for k, v in trainer.ref_model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())
    first = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[0]
    # Step 1: the policy is its reference, so every log-ratio is 0 up to float32 round-off (the policy's
    # forward runs under autograd, the reference's without: sdpa may pick another CPU kernel).
    assert abs(first["rewards/margins"]) < 1e-5 and abs(first["kl"]) < 1e-5
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)


def test_lora_trains_only_the_adapter_and_uses_the_base_as_reference(tmp_path, tokenizer):
    pytest.importorskip("peft")
    vocab = len(tokenizer)
    pairs = random_pairs(4, vocab, seed=13)
    trainer = DPOTrainer(tiny_model(vocab), tokenizer, pairs,
                         config=make_config(tmp_path, lora_r=4, max_steps=2, learning_rate=1e-2, merge_lora=True))
    assert trainer.has_adapter
    trainer.train()
    assert trainer.ref_model is None
    first = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert abs(first["rewards/margins"]) < 1e-5  # LoRA B starts at 0: policy == base == reference (round-off aside)
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    assert not any("lora" in k for k in reloaded.state_dict())
