"""The TRL drop-in gives TRL's loss, gradients and rewards metrics on the same batch."""

import copy
import functools
import random
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402

from dpo_fast.loss import functional, oracle  # noqa: E402
from dpo_fast.loss.ops import schedule  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.tiny_tokenizer import WORDS, make_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "Hello world, the cat sat on the mat?", "chosen": " Yes, the cat sat.", "rejected": " No dog."},
    {"prompt": "Explain python code please:", "chosen": " A function returns a value.", "rejected": " Maybe."},
    {"prompt": "Write a poem", "chosen": " The sun and the moon, blue river water.", "rejected": " Red fire tree."},
    {"prompt": "One two three four five", "chosen": " seven eleven", "rejected": " sorry I think no"},
]


def _words(rng, n):
    return " " + " ".join(rng.choice(WORDS) for _ in range(n))


_rng = random.Random(0)
# Three pairs of 60-90 completion tokens: enough scored tokens per pair for the torch backend's one-pass
# schedule (TORCH_MIN_TOKENS_PER_PAIR), and unequal lengths, so the batch is padded.
LONG_ROWS = [{"prompt": _words(_rng, 4 + 3 * i), "chosen": _words(_rng, 40 + 5 * i),
              "rejected": _words(_rng, 30 + 9 * i)} for i in range(3)]


def build_trainer(tmp_path, loss_type, label_smoothing=0.0, precompute=False, rows=ROWS, max_length=64,
                  loss_weights=None, **dpo_args):
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
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                         max_length=max_length,
                         loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
                         loss_weights=loss_weights, label_smoothing=label_smoothing, beta=0.3, use_cpu=True,
                         precompute_ref_log_probs=precompute, dataloader_drop_last=False, seed=0, **dpo_args)
    trainer = trl.DPOTrainer(model=model, ref_model=None if precompute else ref, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
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


@pytest.mark.parametrize("loss_type, smoothing, dpo_args", [("sigmoid", 0.0, {}), ("ipo", 0.0, {}), ("robust", 0.1, {}),
                                                          ("discopop", 0.0, {"discopop_tau": 0.2})])
def test_same_loss_grads_and_metrics_as_trl(tmp_path, loss_type, smoothing, dpo_args):
    from dpo_fast.integrations import trl as fast

    trainer, batch = build_trainer(tmp_path, loss_type, smoothing, **dpo_args)
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


def spy_schedules(monkeypatch):
    """The schedules `linear_dpo_loss` picks from now on, in call order."""
    picked = []
    original = schedule.linear_loss_schedule

    def spy(*args, **kwargs):
        picked.append(original(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(schedule, "linear_loss_schedule", spy)
    return picked


def oracle_in_float64(trainer, batch, loss_type, label_smoothing, weight):
    """Loss and gradients with the head and the loss in float64 (`oracle.linear_dpo_loss`: full logits)
    from the drop-in's own float32 hidden states, TRL's settings spelled out here; the backbones' backward
    stays float32, as in the drop-in."""
    from dpo_fast.integrations.hidden import last_hidden_state

    trainer.model.zero_grad()
    mask = batch["completion_mask"]
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("ref_")}
    hidden = last_hidden_state(trainer.model, kwargs)
    if trainer.precompute_ref_logps:
        reference_kwargs = {"ref_chosen_logps": batch["ref_chosen_logps"],
                            "ref_rejected_logps": batch["ref_rejected_logps"]}
    else:
        with torch.no_grad(), trainer.accelerator.autocast():  # as TRL's reference forward
            reference_kwargs = {"ref_hidden": last_hidden_state(trainer.ref_model, kwargs),
                                "ref_weight": trainer.ref_model.lm_head.weight}
    out = oracle.linear_dpo_loss(hidden, trainer.model.lm_head.weight, labels, beta=trainer.beta,
                                    loss_type=loss_type, label_smoothing=label_smoothing, **reference_kwargs)
    loss = out.loss * weight
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type, smoothing, used_smoothing, weight, precompute",
                         [("sigmoid", 0.1, 0.0, 0.5, False), ("ipo", 0.0, 0.0, 1.0, False),
                          ("robust", 0.2, 0.2, 1.0, True)])
def test_single_loss_type_runs_the_one_pass_schedule(tmp_path, monkeypatch, backend, loss_type, smoothing,
                                                    used_smoothing, weight, precompute):
    """A pair-separable loss goes through `linear_dpo_loss`'s one-pass schedule (the torch one, which the
    CPU's "auto" picks, and the triton one, the CUDA default, here under TRITON_INTERPRET=1): loss and
    gradients match the float64 oracle with the float32 tolerances, and gradients and metrics match TRL's
    own float32 `_compute_loss` as closely as the per-sequence path did (TRL's float32 loss is itself
    ~2e-5 off the oracle on these 60-90 token sums). TRL's `sigmoid` ignores label_smoothing, ipo
    is length-normalised, a loss weight scales the loss, and reference log-probs come from the reference
    model or precomputed with the batch."""
    from dpo_fast.integrations import trl as fast

    trainer, batch = build_trainer(tmp_path, loss_type, smoothing, precompute, rows=LONG_ROWS, max_length=256,
                                   loss_weights=[weight], bf16=False)
    if precompute:  # the reference log-probs come with the batch, computed from the initial policy: move it
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    assert (batch["attention_mask"] == 0).any()  # padded
    _, trl_grads, trl_metrics = loss_and_grads(trainer, batch, trl.DPOTrainer._compute_loss)
    fast._prepare(trainer)
    exp_loss, exp_grads = oracle_in_float64(trainer, batch, loss_type, used_smoothing, weight)
    if backend == "triton":
        monkeypatch.setattr(fast, "linear_dpo_loss", functools.partial(functional.linear_dpo_loss, backend="triton"))
    picked = spy_schedules(monkeypatch)
    loss, grads, metrics = loss_and_grads(trainer, batch, fast.compute_loss)
    assert picked == [schedule.TORCH_ONE_PASS if backend == "torch" else schedule.TRITON_ONE_PASS]
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert set(grads) == set(exp_grads) == set(trl_grads)
    for name in exp_grads:
        assert_close(grads[name], exp_grads[name], torch.float32, name)
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert set(metrics) == set(trl_metrics) and len(metrics) == 6
    for k in trl_metrics:
        assert metrics[k] == pytest.approx(trl_metrics[k], rel=1e-4, abs=1e-6), k
    assert abs(trl_metrics["rewards/margins"]) > 1e-4


def test_mixed_loss_types_keep_the_per_sequence_path(tmp_path, monkeypatch):
    """`sft` (TRL averages it over the batch's chosen tokens) mixed with a DPO loss is not one call of
    `linear_dpo_loss`: the drop-in takes per-sequence log-probs and TRL's formulas, and matches TRL."""
    from dpo_fast.integrations import trl as fast

    trainer, batch = build_trainer(tmp_path, ["sigmoid", "sft"], rows=LONG_ROWS, max_length=256,
                                   loss_weights=[1.0, 0.3], bf16=False)
    trl_loss, trl_grads, _ = loss_and_grads(trainer, batch, trl.DPOTrainer._compute_loss)
    fast._prepare(trainer)
    picked = spy_schedules(monkeypatch)
    loss, grads, _ = loss_and_grads(trainer, batch, fast.compute_loss)
    assert picked == []
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name in trl_grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_which_settings_one_loss_call_expresses():
    from dpo_fast.integrations.trl import _single_loss_config

    def trainer(*loss_types):
        return SimpleNamespace(loss_types=list(loss_types), beta=0.2, label_smoothing=0.1,
                               args=SimpleNamespace(discopop_tau=0.3))

    scored = torch.tensor([[-100, 3, 4], [-100, -100, 5]])
    empty = torch.tensor([[-100, 3, 4], [-100, -100, -100]])  # a completion truncated away
    config = _single_loss_config(trainer("sigmoid"), empty)
    assert (config.loss_type, config.beta, config.label_smoothing) == ("sigmoid", 0.2, 0.0)  # TRL ignores it
    assert _single_loss_config(trainer("robust"), scored).label_smoothing == 0.1
    assert _single_loss_config(trainer("ipo"), scored).loss_type == "ipo"
    assert _single_loss_config(trainer("discopop"), scored).discopop_tau == 0.3  # TRL's DPOConfig.discopop_tau
    # TRL divides by max(length, 1) where linear_dpo_loss refuses an empty row: the per-sequence path.
    assert _single_loss_config(trainer("ipo"), empty) is None
    assert _single_loss_config(trainer("sft"), scored) is None
    assert _single_loss_config(trainer("sigmoid", "bco_pair"), scored) is None
