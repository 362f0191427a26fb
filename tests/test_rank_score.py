"""Ranking models with a known order, and the `score` / `rank` subcommands end to end.

The known order: from one random tiny Llama (the reference), a few DPO steps on the sorting task's
preference pairs give "trained"; the same steps with chosen and rejected swapped give "anti". On those
pairs, trained's implicit reward prefers the chosen answers, anti's the rejected ones, and the reference
scored against itself has margin 0 on every pair, so the ranking must be trained > reference > anti.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_close  # noqa: E402

from dpo_fast import dpo_loss, linear_sequence_logps
from dpo_fast.commands import rank as rank_command  # noqa: E402
from dpo_fast.commands import score as score_command  # noqa: E402
from dpo_fast.data.attention import attention_kwargs  # noqa: E402
from dpo_fast.data.layouts import build_batch  # noqa: E402
from dpo_fast.demo import tasks  # noqa: E402
from dpo_fast.evaluation import rewards as evaluation
from dpo_fast.training.scoring import pair_logps  # noqa: E402

BETA = 0.5
MAX_LENGTH = 32
N_BOOTSTRAP = 200


def tiny_llama(tokenizer, seed: int, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def dpo_steps(reference, tokenizer, rows, *, steps: int = 5, lr: float = 3e-3):
    """A copy of `reference` after `steps` full-batch DPO (sigmoid) steps on `rows` (fused head log-probs)."""
    pairs = [tasks.tokenize_row(tokenizer, row, index=i) for i, row in enumerate(rows)]
    ref_chosen, ref_rejected = pair_logps(reference, tokenizer, pairs, max_length=MAX_LENGTH)
    batch = build_batch(pairs, "prefix_shared", pad_id=tokenizer.pad_token_id, max_tokens_per_row=128)
    attention = attention_kwargs(batch, "sdpa", torch.float32, "cpu")
    policy = copy.deepcopy(reference).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    b = len(pairs)
    for _ in range(steps):
        hidden = policy.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              **attention).last_hidden_state
        logps, _ = linear_sequence_logps(hidden.reshape(-1, hidden.shape[-1]), policy.lm_head.weight,
                                         batch.labels.reshape(-1), segment_ids=batch.segment_ids.reshape(-1))
        loss = dpo_loss(logps[:b], logps[b:], ref_chosen, ref_rejected, beta=BETA).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


@pytest.fixture(scope="module")
def task():
    tokenizer = tasks.build_tokenizer()
    splits = tasks.make_prompts(16, 1, seed=0, max_len=4)
    rows = tasks.make_preference_rows(splits.train, seed=1)
    swapped = [tasks.PreferenceRow(r.prompt, r.rejected, r.chosen) for r in rows]
    reference = tiny_llama(tokenizer, 0)
    trained = dpo_steps(reference, tokenizer, rows)
    anti = dpo_steps(reference, tokenizer, swapped)
    data = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rows]
    return {"tokenizer": tokenizer, "reference": reference, "trained": trained, "anti": anti, "data": data}


def test_trained_model_ranks_first(task, monkeypatch, tmp_path):
    tokenizer, ref, data = task["tokenizer"], task["reference"], task["data"]
    entries = [("anti", task["anti"], ref), ("reference", ref, ref), ("trained", task["trained"], ref)]
    calls = []

    def counting(model, *args, **kwargs):
        calls.append(id(model))
        return pair_logps(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "pair_logps", counting)
    result = evaluation.rank_models(entries, tokenizer, data, beta=BETA, n_bootstrap=N_BOOTSTRAP,
                                    max_length=MAX_LENGTH)
    monkeypatch.undo()
    # k = 3 models, the reference among them: 3 passes over the data, each model object once.
    assert sorted(calls) == sorted(id(m) for _, m, _ in entries) and result.forward_passes == 3

    names = [result.names[i] for i in result.order]
    assert names == ["trained", "reference", "anti"], result.table()
    acc = dict(zip(result.names, result.reward_accuracy))
    assert acc["reference"] == 0.0  # margin 0 on every pair: never strictly preferred
    assert acc["trained"] > 0.5 and acc["trained"] > acc["anti"], result.table()

    # Per-model numbers against independent paths: score_pairs margins and plain pair_logps comparisons.
    margins = {}
    for name, model, reference in entries:
        scored = evaluation.score_pairs(model, reference, tokenizer, data, beta=BETA, max_length=MAX_LENGTH,
                                        n_bootstrap=20)
        margins[name] = scored.margins.tolist()
        assert result.reward_accuracy[result.names.index(name)] == pytest.approx(scored.accuracy, abs=1e-12)
        chosen, rejected = pair_logps(model, tokenizer, data, max_length=MAX_LENGTH)
        likelihood = sum(c > r for c, r in zip(chosen.tolist(), rejected.tolist())) / len(data)
        assert result.likelihood_accuracy[result.names.index(name)] == pytest.approx(likelihood, abs=1e-12)
    for a, name_a in enumerate(result.names):
        for b, name_b in enumerate(result.names):
            if a == b:
                continue
            pairs = zip(margins[name_a], margins[name_b])
            wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs)
            assert float(result.win_rate[a, b]) == pytest.approx(wins / len(data), abs=1e-6), (name_a, name_b)
            assert float(result.win_rate[a, b] + result.win_rate[b, a]) == pytest.approx(1.0, abs=1e-6)
    expected_strengths = evaluation.bradley_terry(result.win_rate.double() * len(data), prior=result.prior)
    assert torch.allclose(torch.tensor(result.strengths, dtype=torch.float64), expected_strengths, atol=1e-6)

    for values, intervals in ((result.reward_accuracy, result.reward_accuracy_ci),
                              (result.likelihood_accuracy, result.likelihood_accuracy_ci),
                              (result.strengths, result.strength_ci)):
        for value, (lo, hi) in zip(values, intervals):
            # Point and resamples are separate float64 fits: allow their round-off (a strength of exactly
            # 0 by symmetry comes out as +-1e-16 from either).
            assert lo - 1e-12 <= value <= hi + 1e-12, (value, lo, hi)

    paths = evaluation.write_rank_outputs(result, str(tmp_path / "out"))
    summary = json.loads(open(paths["json"]).read())
    assert [m["name"] for m in summary["models"]] == ["trained", "reference", "anti"]
    assert summary["forward_passes"] == 3 and summary["num_pairs"] == len(data)
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["rank.json", "rank.png"]  # no temporary file left


def test_rank_models_errors(task):
    tokenizer, ref = task["tokenizer"], task["reference"]
    with pytest.raises(ValueError, match="distinct"):
        evaluation.rank_models([("a", ref, None), ("a", ref, None)], tokenizer, task["data"], beta=BETA)
    with pytest.raises(ValueError, match="models is empty"):
        evaluation.rank_models([], tokenizer, task["data"], beta=BETA)
    other = tiny_llama(tokenizer, 1, vocab_size=len(tokenizer) + 3)
    with pytest.raises(ValueError, match="'a' and 'reference of b' do not share a vocabulary"):
        evaluation.rank_models([("a", ref, None), ("b", ref, other)], tokenizer, task["data"], beta=BETA)


# ---------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name in ("reference", "trained", "anti"):
        dirs[name] = str(root / name)
        task[name].save_pretrained(dirs[name])
        task["tokenizer"].save_pretrained(dirs[name])
    dirs["other_vocab"] = str(root / "other_vocab")
    other = tiny_llama(task["tokenizer"], 2, vocab_size=len(task["tokenizer"]) + 5)
    other.save_pretrained(dirs["other_vocab"])
    dirs["data"] = str(root / "prefs.jsonl")
    with open(dirs["data"], "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in task["data"])
    dirs["empty"] = str(root / "empty.jsonl")
    open(dirs["empty"], "w").close()
    return dirs


def parse(module, argv):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_score_command_writes_one_row_per_pair(task, saved, tmp_path, capsys):
    output = tmp_path / "scores.jsonl"
    args = parse(score_command, ["--model", saved["trained"], "--ref-model", saved["reference"], "--data",
                                 saved["data"], "--beta", str(BETA), "--max-length", str(MAX_LENGTH),
                                 "--n-bootstrap", "50", "--output", str(output)])
    assert score_command.run(args) == 0
    out = capsys.readouterr().out
    assert "reward accuracy" in out and "Wilson" in out and "mean margin" in out and "bootstrap" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == len(task["data"])
    assert set(rows[0]) == {"index", "chosen_reward", "rejected_reward", "margin", "correct"}
    expected = evaluation.score_pairs(task["trained"], task["reference"], task["tokenizer"], task["data"],
                                      beta=BETA, max_length=MAX_LENGTH, n_bootstrap=50)
    assert [r["index"] for r in rows] == expected.index
    columns = (("chosen_reward", expected.chosen_rewards), ("rejected_reward", expected.rejected_rewards),
               ("margin", expected.margins))
    for key, values in columns:
        assert_close(torch.tensor([r[key] for r in rows]), values.double(), torch.float32, key)
    assert [r["correct"] for r in rows] == expected.correct.tolist()
    assert f"{expected.accuracy:.4f}" in out
    assert sorted(os.listdir(tmp_path)) == ["scores.jsonl"]


@pytest.mark.parametrize("case", ["missing_model", "missing_ref", "vocab", "empty_data", "missing_data"])
def test_score_command_errors_write_nothing(saved, tmp_path, capsys, case):
    model, ref, data = saved["trained"], saved["reference"], saved["data"]
    expected = {
        "missing_model": "--model: '/nonexistent/policy' is not a local directory",
        "missing_ref": "--ref-model: '/nonexistent/ref' is not a local directory",
        "vocab": "config.vocab_size",
        "empty_data": "no rows",
        "missing_data": "--data: '/nonexistent/prefs.jsonl' does not exist",
    }[case]
    if case == "missing_model":
        model = "/nonexistent/policy"
    elif case == "missing_ref":
        ref = "/nonexistent/ref"
    elif case == "vocab":
        ref = saved["other_vocab"]
    elif case == "empty_data":
        data = saved["empty"]
    else:
        data = "/nonexistent/prefs.jsonl"
    output = tmp_path / "scores.jsonl"
    args = parse(score_command, ["--model", model, "--ref-model", ref, "--data", data, "--max-length",
                                 str(MAX_LENGTH), "--output", str(output)])
    assert score_command.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpo-fast score: error:") and expected in err, err
    if case == "vocab":
        assert saved["other_vocab"] in err and saved["trained"] in err  # both models named
    assert os.listdir(tmp_path) == []


def test_rank_command(task, saved, tmp_path, capsys):
    out_dir = tmp_path / "ranking"
    args = parse(rank_command, ["--model", saved["anti"], "--model", saved["reference"], "--model",
                                saved["trained"], "--ref-model", saved["reference"], "--data", saved["data"],
                                "--beta", str(BETA), "--max-length", str(MAX_LENGTH), "--n-bootstrap", "50",
                                "--output-dir", str(out_dir)])
    assert rank_command.run(args) == 0
    out = capsys.readouterr().out
    assert "win rate" in out and "BT strength" in out
    summary = json.loads((out_dir / "rank.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["trained", "reference", "anti"]
    # The reference directory is both a ranked model and the reference: loaded and scored once.
    assert summary["forward_passes"] == 3
    assert (out_dir / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_command_errors_write_nothing(saved, tmp_path, capsys):
    out_dir = tmp_path / "ranking"
    base = ["--model", saved["trained"], "--model", saved["anti"], "--data", saved["data"], "--output-dir",
            str(out_dir), "--max-length", str(MAX_LENGTH)]
    cases = [
        (["--ref-models", saved["reference"]], "--ref-models lists 1 references for 2 --model"),
        (["--ref-models", f"{saved['reference']},{saved['other_vocab']}"], "config.vocab_size"),
        (["--ref-model", "/nonexistent/ref"], "--ref-model: '/nonexistent/ref' is not a local directory"),
        (["--reference-free", "--name", "x"], "got 1 --name for 2 --model"),
    ]
    for extra, message in cases:
        assert rank_command.run(parse(rank_command, base + extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("dpo-fast rank: error:") and message in err, err
        assert not out_dir.exists()


def test_rank_help_states_the_costs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        rank_command.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "k forward passes" in text and "k^2 in comparisons" in text
