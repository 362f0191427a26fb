"""The TRL drop-in gives TRL's loss, gradients and rewards metrics on the same batch."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402

from tests.tiny_tokenizer import make_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "Hello world, the cat sat on the mat?", "chosen": " Yes, the cat sat.", "rejected": " No dog."},
    {"prompt": "Explain python code please:", "chosen": " A function returns a value.", "rejected": " Maybe."},
    {"prompt": "Write a poem", "chosen": " The sun and the moon, blue river water.", "rejected": " Red fire tree."},
    {"prompt": "One two three four five", "chosen": " seven eleven", "rejected": " sorry I think no"},
]


def build_trainer(tmp_path, loss_type, label_smoothing=0.0, precompute=False):
    torch.manual_seed(0)
    tok = make_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config).float()
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so rewards are not all zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", max_length=64,
                         loss_type=[loss_type], label_smoothing=label_smoothing, beta=0.3, use_cpu=True,
                         precompute_ref_log_probs=precompute, dataloader_drop_last=False, seed=0)
    trainer = trl.DPOTrainer(model=model, ref_model=None if precompute else ref, args=args,
                             train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def loss_and_grads(trainer, batch, fn):
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer.model.train()
    loss = fn(trainer, trainer.model, batch, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_same_loss_grads_and_metrics_as_trl(tmp_path, loss_type, smoothing):
    from dpo_fast.integrations import trl as fast

    trainer, batch = build_trainer(tmp_path, loss_type, smoothing)
    trl_loss, trl_grads, trl_metrics = loss_and_grads(trainer, batch, trl.DPOTrainer._compute_loss)
    fast._prepare(trainer)
    our_loss, our_grads, our_metrics = loss_and_grads(trainer, batch, fast.compute_loss)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert set(our_metrics) == set(trl_metrics) and len(our_metrics) == 6
    for k in trl_metrics:
        assert our_metrics[k] == pytest.approx(trl_metrics[k], rel=1e-4, abs=1e-6), k
    assert abs(trl_metrics["rewards/margins"]) > 1e-4  # the comparison sees non-trivial rewards
    assert set(our_grads) == set(trl_grads)
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_subclass_trains_and_rejects_unsupported_options(tmp_path):
    from dpo_fast.integrations.trl import DPOTrainer

    trainer, _ = build_trainer(tmp_path, "sigmoid")
    fast = DPOTrainer(model=trainer.model, ref_model=trainer.ref_model, args=trainer.args,
                      train_dataset=Dataset.from_list(ROWS), processing_class=trainer.processing_class)
    fast.args.max_steps = 2
    result = fast.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    args = copy.deepcopy(trainer.args)
    args.use_weighting = True
    with pytest.raises(NotImplementedError, match="use_weighting"):
        DPOTrainer(model=trainer.model, ref_model=trainer.ref_model, args=args,
                   train_dataset=Dataset.from_list(ROWS), processing_class=trainer.processing_class)
