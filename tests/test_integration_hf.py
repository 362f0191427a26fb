"""`DPOComputeLoss` on transformers' Trainer matches a naive full-logits DPO on the same batch."""

import copy

import pytest
import torch
import transformers

from dpo_fast import dpo_loss, reference
from dpo_fast.integrations.hf import DPOComputeLoss, aligned_labels, compute_dpo_loss


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def batch(b=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 50, (2 * b, length), generator=g)
    completion = torch.zeros_like(input_ids)
    completion[:, 4:] = 1
    completion[1, -2:] = 0  # padding at the end of one row
    attention = torch.ones_like(input_ids)
    attention[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def naive_logps(model, inputs):
    labels = aligned_labels(inputs)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return reference.sequence_logps(logits, labels)


def test_matches_naive_dpo_with_reference_model():
    policy, ref = tiny_model(0), tiny_model(1)
    policy2 = copy.deepcopy(policy)
    inputs = batch()
    out = compute_dpo_loss(policy, inputs, ref_model=ref, beta=0.5, backend="torch")
    out.loss.backward()
    pol = naive_logps(policy2, inputs)
    with torch.no_grad():
        ref_lp = naive_logps(ref, inputs)
    exp = dpo_loss(pol[:2], pol[2:], ref_lp[:2], ref_lp[2:], beta=0.5)
    exp.loss.backward()
    torch.testing.assert_close(out.loss.double(), exp.loss, rtol=1e-5, atol=1e-6)
    for (n, p), (_, p2) in zip(policy.named_parameters(), policy2.named_parameters()):
        assert p.grad is not None and p2.grad is not None, n
        torch.testing.assert_close(p.grad, p2.grad.float(), rtol=1e-4, atol=1e-6, msg=n)


def test_labels_form_equals_completion_mask_form_and_trainer_hook():
    policy = tiny_model(0)
    inputs = batch()
    hf_style = dict(inputs)
    hf_style["labels"] = inputs["input_ids"].masked_fill(inputs.pop("completion_mask") == 0, -100)
    inputs = batch()
    a = compute_dpo_loss(policy, inputs, backend="torch")
    c = compute_dpo_loss(policy, hf_style, backend="torch")
    torch.testing.assert_close(a.losses, c.losses)
    hook = DPOComputeLoss(beta=0.1, backend="torch")
    loss = hook(policy, inputs)
    torch.testing.assert_close(loss, a.loss)
    with pytest.raises(ValueError, match="loss_type"):
        DPOComputeLoss(loss_type="bogus")
    with pytest.raises(ValueError, match="completion_mask` or `labels"):
        compute_dpo_loss(policy, {"input_ids": inputs["input_ids"]})
