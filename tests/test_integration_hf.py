"""`DPOComputeLoss` on transformers' Trainer matches a naive full-logits DPO on the same batch."""

import copy

import pytest
import torch
import transformers

from dpo_fast import dpo_loss, linear_sequence_logps
from dpo_fast.integrations.hf import DPOComputeLoss, aligned_labels, compute_dpo_loss
from dpo_fast.loss import oracle
from dpo_fast.loss.ops import schedule
from tests.helpers import assert_close


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
    return oracle.sequence_logps(logits, labels)


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type, nll_weight, precomputed", [("sigmoid", 0.0, False), ("nca_pair", 0.4, True)])
def test_pair_separable_loss_runs_the_one_pass_schedule(monkeypatch, backend, loss_type, nll_weight, precomputed):
    """Two pairs of ~75 scored tokens a side: the backend's one-pass schedule runs (the torch one is what
    "auto" picks on the CPU; the triton one, the CUDA default, here under TRITON_INTERPRET=1), with a
    reference model or precomputed reference log-probs, with the RPO term too; the sequence log-probs, the
    loss and every parameter's gradient match the float64 oracle with the float32 tolerances.

    The oracle: full logits in float64 from the same float32 hidden states, summed per sequence, then the
    loss formula in float64, its coefficients evaluated at the drop-in's own float32 sums (compared with
    the float64 sums first). A float32 sum of ~75 log-probs of ~-4 carries ~1e-4 of round-off (the old
    path's sums had it too), which a DPO loss turns into a relative error of ~beta*1e-4 in every gradient,
    above the table's float32 row; the straight-through keeps that out of the gradient comparison.
    """
    picked = []
    original = schedule.linear_loss_schedule
    monkeypatch.setattr(schedule, "linear_loss_schedule",
                        lambda *a, **k: picked.append(original(*a, **k)) or picked[-1])
    policy, ref = tiny_model(0), tiny_model(1)
    policy2 = copy.deepcopy(policy)
    inputs = batch(length=80)
    labels = aligned_labels(inputs)
    kwargs = {"beta": 0.5, "loss_type": loss_type, "nll_weight": nll_weight}
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        # What the drop-in computes from the reference model (its forward-only path), or what a user precomputed.
        ref_logps, _ = linear_sequence_logps(ref_hidden, ref.lm_head.weight, labels, backend=backend)
        exact = oracle.sequence_logps(ref_hidden.double() @ ref.lm_head.weight.double().T, labels)
        assert_close(ref_logps, exact, torch.float32, "ref_logps")
    if precomputed:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logps.chunk(2)
    out = compute_dpo_loss(policy, inputs, ref_model=None if precomputed else ref, backend=backend, **kwargs)
    out.loss.backward()
    assert picked == [schedule.TORCH_ONE_PASS if backend == "torch" else schedule.TRITON_ONE_PASS]

    hidden = policy2.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    logps = oracle.sequence_logps(hidden.double() @ policy2.lm_head.weight.double().T, labels)
    ours = torch.cat([out.chosen_logps, out.rejected_logps])
    assert_close(ours, logps, torch.float32, "sequence logps")
    logps = logps + (ours.double() - logps).detach()  # value: ours; gradient: the float64 oracle's
    lengths = (labels != -100).sum(dim=1)
    expected = dpo_loss(logps[:2], logps[2:], *ref_logps.double().chunk(2), chosen_lengths=lengths[:2],
                        rejected_lengths=lengths[2:], **kwargs)
    expected.loss.backward()
    assert_close(out.loss, expected.loss, torch.float32, "loss")
    for (name, p), (_, p2) in zip(policy.named_parameters(), policy2.named_parameters()):
        assert p.grad is not None and p2.grad is not None, name
        assert_close(p.grad, p2.grad, torch.float32, name)
