"""Layouts, attention masks and `pair_logps`.

The layouts are checked twice over. Structurally: for every scored position, the keys its mask lets
it see, read in row order, must be exactly the true prefix of its own sequence (prompt + completion)
at positions 0..pos, and its label the next token of that sequence. Numerically: tiny random causal
LMs must give, in all three layouts, the per-pair log-probs of separate unpadded forwards scored with
full float64 log-softmax.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from attention_doubles import eager_flex_attention, register_varlen_sdpa, use_varlen_sdpa
from helpers import assert_close

from dpo_fast.data.attention import (
    FLEX_BLOCK_SIZE,
    _next_same_position,
    allowed_pairs,
    attention_kwargs,
    attention_mask_4d,
    flex_block_mask,
    model_inputs,
    preferred_attention,
    varlen_cu_seqlens,
)
from dpo_fast.data.layouts import build_batch, group_pairs, pair_cost
from dpo_fast.data.pairs import IGNORE_INDEX, LAYOUTS, ROLE_PAD, TokenizedPair
from dpo_fast.training.scoring import pair_logps

VOCAB = 100


def random_pairs(seed: int, n: int, prompt: tuple[int, int], completion: tuple[int, int]) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(bounds):
        return tuple(rng.randrange(VOCAB) for _ in range(rng.randint(*bounds)))

    return [TokenizedPair(ids(prompt), ids(completion), ids(completion), index=100 + i) for i in range(n)]


def mixed_pairs(seed: int = 0) -> list[TokenizedPair]:
    """Single-turn-like (short prompts), multi-turn-like (long prompts) and the one-token extremes."""
    pairs = random_pairs(seed, 5, (1, 8), (1, 30)) + random_pairs(seed + 1, 4, (20, 40), (1, 30))
    pairs += [TokenizedPair((7,), (3,), (9,), index=1), TokenizedPair(tuple(range(40)), (5,), tuple(range(30)), 2)]
    random.Random(seed).shuffle(pairs)
    return pairs


# ----------------------------------------------------------------------------------------------------
# Structure


def check_structure(batch, pairs):
    """Every scored position sees exactly its own sequence's prefix, in order, and predicts the next token."""
    b = batch.num_pairs
    allowed = allowed_pairs(batch)
    ids, pos, labels, segs = batch.input_ids, batch.position_ids, batch.labels, batch.segment_ids
    assert torch.equal(segs >= 0, labels != IGNORE_INDEX), "segment ids must mark exactly the scored labels"
    seen_labels = {s: [] for s in range(2 * b)}
    for r in range(ids.shape[0]):
        for q in range(ids.shape[1]):
            s = int(segs[r, q])
            if s < 0:
                continue
            pair = pairs[s % b]
            sequence = pair.prompt_ids + (pair.chosen_ids if s < b else pair.rejected_ids)
            keys = allowed[r, q].nonzero().squeeze(-1)
            p = int(pos[r, q])
            assert pos[r, keys].tolist() == list(range(p + 1)), f"row {r} col {q}: context positions"
            assert ids[r, keys].tolist() == list(sequence[:p + 1]), f"row {r} col {q}: context tokens"
            assert int(labels[r, q]) == sequence[p + 1]
            assert int(batch.document_ids[r, q]) == s % b
            seen_labels[s].append(int(labels[r, q]))
    for s in range(2 * b):
        pair = pairs[s % b]
        assert tuple(seen_labels[s]) == (pair.chosen_ids if s < b else pair.rejected_ids), f"sequence {s} labels"
    pad = batch.roles == ROLE_PAD
    assert torch.equal(pad, batch.document_ids < 0)
    # Padding sees itself only, and no real token sees padding.
    eye = torch.eye(ids.shape[1], dtype=torch.bool).expand_as(allowed)
    assert torch.equal(allowed & (pad.unsqueeze(2) | pad.unsqueeze(1)), eye & pad.unsqueeze(2))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("row_tokens", [None, 110])
def test_layout_contexts_and_labels(layout, row_tokens):
    pairs = mixed_pairs(3)
    batch = build_batch(pairs, layout, pad_id=0, max_tokens_per_row=row_tokens)
    assert batch.layout == layout and batch.num_pairs == len(pairs)
    assert batch.pair_indices == tuple(p.index for p in pairs)
    check_structure(batch, pairs)
    expected_tokens = sum(pair_cost(p, layout) for p in pairs)
    assert batch.num_tokens == expected_tokens
    if layout == "padded":
        assert batch.input_ids.shape[0] == 2 * len(pairs)
    elif row_tokens is not None:
        assert batch.input_ids.shape[1] <= row_tokens
        docs_per_row = [len(set(r[r >= 0].tolist())) for r in batch.document_ids]
        assert max(docs_per_row) >= 2, "this test must put several pairs in one row"


def test_prefix_shared_positions_and_copy():
    """The rejected branch starts with a copy of the last prompt token at position P-1, then continues at P."""
    pair = random_pairs(5, 1, (4, 9), (2, 6))[0]
    batch = build_batch([pair], "prefix_shared", pad_id=0)
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    start = p + c
    assert batch.input_ids[0, start] == pair.prompt_ids[-1]
    assert batch.position_ids[0].tolist() == list(range(p + c)) + list(range(p - 1, p + r))
    assert batch.num_tokens == p + c + 1 + r


def test_attention_mask_4d_values():
    batch = build_batch(mixed_pairs(1), "prefix_shared", pad_id=0, max_tokens_per_row=120)
    allowed = allowed_pairs(batch)
    for dtype in (torch.float32, torch.bfloat16):
        mask = attention_mask_4d(batch, dtype)
        assert mask.shape == (allowed.shape[0], 1, *allowed.shape[1:]) and mask.dtype == dtype
        assert torch.equal(mask[:, 0] == 0, allowed)
        assert torch.equal(mask[:, 0] == torch.finfo(dtype).min, ~allowed)
    with pytest.raises(TypeError, match="floating"):
        attention_mask_4d(batch, torch.int32)


def test_next_same_position_matches_all_pairs_definition():
    for layout in LAYOUTS:
        batch = build_batch(mixed_pairs(4), layout, pad_id=0, max_tokens_per_row=100)
        doc, pos = batch.document_ids, batch.position_ids
        length = doc.shape[1]
        cols = torch.arange(length)
        same = (doc.unsqueeze(2) == doc.unsqueeze(1)) & (pos.unsqueeze(2) == pos.unsqueeze(1)) & \
            (cols.view(1, 1, -1) > cols.view(1, -1, 1))
        expected = torch.where(same, cols.view(1, 1, -1), length).amin(-1)
        assert torch.equal(_next_same_position(doc, pos), expected), layout


def materialised(block_mask, rows: int, length: int) -> torch.Tensor:
    """[R, L, L] bool: what FlexAttention computes from a BlockMask (full blocks all True, partial blocks
    through its mask_mod, the rest False), written out on a grid; for tests only."""
    size = block_mask.BLOCK_SIZE[0]
    blocks = -(-length // size)
    kind = torch.zeros(rows, blocks, blocks, dtype=torch.long)  # 0 empty, 1 partial, 2 full
    for value, count, index in ((1, block_mask.kv_num_blocks, block_mask.kv_indices),
                                (2, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        for r in range(rows):
            for q in range(blocks):
                kind[r, q, index[r, 0, q, :int(count[r, 0, q])].long()] = value
    kind = kind.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :length, :length]
    grid = block_mask.mask_mod(torch.arange(rows).view(-1, 1, 1), 0, torch.arange(length).view(1, -1, 1),
                               torch.arange(length).view(1, 1, -1))
    return (kind == 2) | ((kind == 1) & grid)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_block_mask_equals_the_rule(layout):
    """Random batches (one-token prompts and responses, one pair per row, several per row), several tile
    sizes: the BlockMask FlexAttention runs is the dense rule, and its empty/full blocks are really so."""
    rng = random.Random(7)
    for trial in range(12):
        pairs = mixed_pairs(trial) if trial % 3 == 0 else \
            random_pairs(trial, rng.randint(1, 6), (1, rng.choice([1, 4, 40])), (1, rng.choice([1, 25])))
        row = rng.choice([None, 110])
        batch = build_batch(pairs, layout, pad_id=0, max_tokens_per_row=row,
                            pad_to_multiple_of=rng.choice([1, 16]))
        rows, length = batch.input_ids.shape
        expected = allowed_pairs(batch)
        assert torch.equal(attention_mask_4d(batch, torch.float32)[:, 0] == 0, expected)
        for size in (8, 16, 128):
            block_mask = flex_block_mask(batch, "cpu", block_size=size)
            assert torch.equal(materialised(block_mask, rows, length), expected), (trial, size)
            if size == 8 and length >= 64:
                computed = int((block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).sum())
                assert computed < rows * (-(-length // size)) ** 2, "masked blocks must be skipped"


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_flex_attention_takes_the_block_mask():
    """What CUDA runs: torch.compile traces our mask_mod (a gather from the per-key bounds) and its block
    tables, with GQA and no K/V repeat; here on the CPU (inductor's C++ kernel), against sdpa and the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    batch = build_batch(random_pairs(1, 3, (20, 60), (5, 30)), "prefix_shared", pad_id=0,
                        pad_to_multiple_of=FLEX_BLOCK_SIZE)
    rows, length = batch.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, length, 16, generator=g)
    k, v = (torch.randn(rows, 2, length, 16, generator=g) for _ in range(2))
    got = torch.compile(flex_attention)(q, k, v, block_mask=flex_block_mask(batch, "cpu"), enable_gqa=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=attention_mask_4d(batch, torch.float32))
    real = (batch.roles != ROLE_PAD).view(rows, 1, length, 1).expand_as(got)
    assert_close(got[real], expected[real], torch.float32, "compiled flex_attention")


def test_flex_block_mask_of_a_16k_row_allocates_no_square_tensor():
    """The whole point of the flex path: memory O(L + (L/128)^2). The profiler's allocation events of
    building the mask for a 16k-token row stay far below one L x L bool tensor."""
    from torch.profiler import ProfilerActivity, profile

    pairs = random_pairs(0, 10, (1200, 1300), (200, 300))
    batch = build_batch(pairs, "prefix_shared", pad_id=0, pad_to_multiple_of=FLEX_BLOCK_SIZE)
    length = batch.input_ids.shape[1]
    assert length >= 16384 and length % FLEX_BLOCK_SIZE == 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        flex_block_mask(batch, "cpu")
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations, "the profiler recorded no allocation"
    assert max(allocations) < length * length // 256, f"largest allocation {max(allocations)} bytes"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa_with_mask():
    from torch.nn.attention.flex_attention import flex_attention

    batch = build_batch(random_pairs(4, 4, (1, 20), (1, 12)), "prefix_shared", pad_id=0, max_tokens_per_row=50)
    block_mask = flex_block_mask(batch, "cpu", block_size=16)
    rows, length = batch.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 2, length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask_4d(batch, torch.float64))
    got = flex_attention(q, k, v, block_mask=block_mask)
    real = (batch.roles != ROLE_PAD).view(rows, 1, length, 1).expand_as(got)
    assert_close(got[real].float(), expected[real], torch.float32, "flex_attention")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_varlen_cu_seqlens_matches_mask(layout):
    batch = build_batch(mixed_pairs(6), layout, pad_id=0, max_tokens_per_row=90)
    rows, length = batch.input_ids.shape
    cu, max_seqlen = varlen_cu_seqlens(batch)
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == rows * length
    seq_of = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long()).view(rows, length)
    assert max_seqlen == int((cu[1:] - cu[:-1]).max())
    cols = torch.arange(length)
    block_causal = (seq_of.unsqueeze(2) == seq_of.unsqueeze(1)) & (cols.view(1, 1, -1) <= cols.view(1, -1, 1))
    real = (batch.roles != ROLE_PAD).unsqueeze(2).expand_as(block_causal)
    assert torch.equal(block_causal[real], allowed_pairs(batch)[real])


def test_varlen_refuses_prefix_shared():
    with pytest.raises(ValueError, match="prefix_shared"):
        varlen_cu_seqlens(build_batch(mixed_pairs(), "prefix_shared", pad_id=0))


def test_attention_kwargs_dispatch():
    from torch.nn.attention.flex_attention import BlockMask

    packed = build_batch(mixed_pairs(8), "packed", pad_id=0, max_tokens_per_row=90)
    shared = build_batch(mixed_pairs(8), "prefix_shared", pad_id=0, max_tokens_per_row=120)
    for impl in ("eager", "sdpa", None):
        got = attention_kwargs(shared, impl, torch.float32, "cpu")
        assert torch.equal(got["attention_mask"], attention_mask_4d(shared, torch.float32))
    flex = attention_kwargs(shared, "flex_attention", torch.float32, "cpu")["attention_mask"]
    rows, length = shared.input_ids.shape
    assert isinstance(flex, BlockMask) and tuple(flex.shape) == (rows, 1, length, length)
    flash = attention_kwargs(packed, "flash_attention_2", torch.float32, "cpu")
    cu, longest = varlen_cu_seqlens(packed)
    assert flash["attention_mask"] is None and torch.equal(flash["cu_seq_lens_q"], cu)
    assert flash["cu_seq_lens_k"] is flash["cu_seq_lens_q"]
    assert flash["max_length_q"] == flash["max_length_k"] == longest
    with pytest.raises(ValueError, match="flash_attention_2.*prefix_shared"):
        attention_kwargs(shared, "flash_attention_2", torch.float32, "cpu")


def test_varlen_kwargs_reach_the_attention_layers():
    """The flash path's plumbing on the CPU: a registered varlen attention (named like flash) gets our
    cu_seq_lens through the transformers backbone; run as block-diagonal sdpa, it must score like the 4D mask."""
    calls = []
    register_varlen_sdpa(calls)
    model = tiny_model("llama", "sdpa")
    pairs = mixed_pairs(12)
    expected = pair_logps(model, None, pairs, layout="packed", max_length=80, max_tokens_per_batch=260)
    use_varlen_sdpa(model)
    got = pair_logps(model, None, pairs, layout="packed", max_length=80, max_tokens_per_batch=260)
    assert calls, "the registered attention was not called"
    assert_close(got[0], expected[0], torch.float32, "chosen")
    assert_close(got[1], expected[1], torch.float32, "rejected")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_pairs_budget(layout):
    pairs = mixed_pairs(4) + random_pairs(9, 20, (1, 40), (1, 30))
    budget = 300
    batches = group_pairs(pairs, layout, max_tokens_per_batch=budget)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    for members in batches:
        chosen = [pairs[i] for i in members]
        if layout == "padded":
            batch = build_batch(chosen, layout, pad_id=0)
            assert batch.input_ids.numel() <= budget
        else:
            assert sum(pair_cost(p, layout) for p in chosen) <= budget
    assert len(batches) > 1


def test_bad_input_errors():
    good = TokenizedPair((1, 2), (3,), (4,), index=7)
    with pytest.raises(ValueError, match="layout='bogus'"):
        build_batch([good], "bogus", pad_id=0)
    with pytest.raises(ValueError, match="empty"):
        build_batch([], "packed", pad_id=0)
    with pytest.raises(ValueError, match=r"pairs\[1\] \(dataset row 9\) has an empty prompt_ids"):
        build_batch([good, TokenizedPair((), (3,), (4,), index=9)], "packed", pad_id=0)
    with pytest.raises(ValueError, match="empty rejected_ids"):
        build_batch([TokenizedPair((1,), (3,), (), index=9)], "padded", pad_id=0)
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a TokenizedPair"):
        build_batch([{"prompt": "x"}], "padded", pad_id=0)
    with pytest.raises(ValueError, match=r"pairs\[0\] \(dataset row 7\) needs 5 tokens.*max_tokens_per_row=3"):
        build_batch([TokenizedPair((1, 2), (3,), (4,), index=7)], "prefix_shared", pad_id=0, max_tokens_per_row=3)
    with pytest.raises(ValueError, match="max_tokens_per_batch=5"):
        group_pairs([TokenizedPair((1, 2), (3, 4), (5,), index=7)], "padded", max_tokens_per_batch=5)


# ----------------------------------------------------------------------------------------------------
# Models: every layout against separate unpadded forwards with full float64 logits


def tiny_model(arch: str, attn: str):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":  # head_dim 16: CUDA FlexAttention needs at least 16
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, head_dim=16, **common))
    elif arch == "phi":  # lm_head with a bias, LayerNorm, partial rotary
        model = PhiForCausalLM(PhiConfig(resid_pdrop=0.0, embd_pdrop=0.0, **common))
        torch.nn.init.normal_(model.lm_head.bias)
    elif arch == "gemma2":  # final logit softcapping (and attention softcapping, sliding-window layers)
        model = Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                                               sliding_window=128, **common))
    elif arch == "cohere":  # logit_scale
        model = CohereForCausalLM(CohereConfig(num_key_value_heads=2, logit_scale=0.37, **common))
    else:
        raise AssertionError(arch)
    # Random init gives near-uniform predictions; larger weights make the log-probs discriminating.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


def naive_logps(model, pairs):
    """One forward per prompt + completion, no padding, no mask: log_softmax of full logits in float64."""
    chosen, rejected = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p in pairs:
            for out, completion in ((chosen, p.chosen_ids), (rejected, p.rejected_ids)):
                logits = model(input_ids=torch.tensor([p.prompt_ids + completion], device=device)).logits[0].double()
                logp = torch.log_softmax(logits, dim=-1)
                n = len(p.prompt_ids)
                out.append(sum(float(logp[n - 1 + j, tok]) for j, tok in enumerate(completion)))
    return torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


MODELS = [("llama", "eager"), ("llama", "sdpa"), ("llama", "flex_attention"), ("phi", "sdpa"),
          ("gemma2", "eager"), ("gemma2", "flex_attention"), ("cohere", "sdpa")]


@pytest.fixture(autouse=True)
def flex_uncompiled(monkeypatch):
    if not torch.cuda.is_available():
        eager_flex_attention(monkeypatch)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("arch,attn", MODELS)
def test_pair_logps_all_layouts_match_separate_forwards(arch, attn):
    model = tiny_model(arch, attn)
    pairs = mixed_pairs(11)
    expected_chosen, expected_rejected = naive_logps(model, pairs)
    # The expectations must tell responses apart, or matching them would prove little.
    assert float((expected_chosen - expected_rejected).abs().max()) > 1.0
    for layout in LAYOUTS:
        # Rows of ~100 tokens (max_length 80, longest unit) under a 260-token budget: several pairs per row,
        # several rows and several batches.
        chosen, rejected = pair_logps(model, None, pairs, layout=layout, max_length=80, max_tokens_per_batch=260)
        assert chosen.dtype == torch.float32 and chosen.shape == (len(pairs),)
        assert_close(chosen, expected_chosen, torch.float32, f"{arch}/{attn}/{layout} chosen")
        assert_close(rejected, expected_rejected, torch.float32, f"{arch}/{attn}/{layout} rejected")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_sdpa_and_eager_give_the_same_pair_logps():
    """One model, its three attention implementations: the same numbers through the same layouts."""
    pairs = mixed_pairs(17)
    model = tiny_model("llama", "sdpa")
    results = {}
    for attn in ("eager", "sdpa", "flex_attention"):
        model.set_attn_implementation(attn)
        for layout in LAYOUTS:
            results[attn, layout] = pair_logps(model, None, pairs, layout=layout, max_length=80,
                                               max_tokens_per_batch=260)
    expected = results["eager", "padded"]
    for key, (chosen, rejected) in results.items():
        assert_close(chosen, expected[0], torch.float32, f"{key} chosen")
        assert_close(rejected, expected[1], torch.float32, f"{key} rejected")


def test_model_inputs_by_implementation():
    from torch.nn.attention.flex_attention import BlockMask

    batch = build_batch(mixed_pairs(8), "prefix_shared", pad_id=0, pad_to_multiple_of=FLEX_BLOCK_SIZE)
    model = tiny_model("llama", "sdpa")
    inputs = model_inputs(model, batch, "cpu")
    assert torch.equal(inputs["input_ids"], batch.input_ids) and torch.equal(inputs["position_ids"],
                                                                             batch.position_ids)
    assert torch.equal(inputs["attention_mask"], attention_mask_4d(batch, torch.float32))
    model.set_attn_implementation("flex_attention")
    assert isinstance(model_inputs(model, batch, "cpu")["attention_mask"], BlockMask)


def test_preferred_attention():
    """FlexAttention for the packed layouts on CUDA when the class supports it; nothing changes elsewhere."""
    model = tiny_model("llama", "sdpa")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert preferred_attention(model, "prefix_shared", cuda) == "flex_attention"
    assert preferred_attention(model, "packed", cuda) == "flex_attention"
    assert preferred_attention(model, "padded", cuda) == "sdpa"
    assert preferred_attention(model, "prefix_shared", cpu) == "sdpa"
    model.config._attn_implementation = "flash_attention_2"
    assert preferred_attention(model, "packed", cuda) == "flash_attention_2"
    model.config._attn_implementation = "sdpa"
    type(model)._supports_flex_attn, supported = False, type(model)._supports_flex_attn
    try:
        assert preferred_attention(model, "prefix_shared", cuda) == "sdpa"
    finally:
        type(model)._supports_flex_attn = supported


def test_pair_logps_reference_path_and_defaults():
    model = tiny_model("llama", "sdpa")
    pairs = random_pairs(21, 3, (1, 12), (1, 9))
    expected = naive_logps(model, pairs)
    for got in (pair_logps(model, None, pairs, reference=True), pair_logps(model, None, pairs)):
        assert_close(got[0], expected[0], torch.float32, "chosen")
        assert_close(got[1], expected[1], torch.float32, "rejected")
    empty = pair_logps(model, None, [])
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_pair_logps_raw_rows_are_tokenized():
    from dpo_fast.data.tokenization import tokenize_pair
    from dpo_fast.demo.tasks import build_tokenizer

    tokenizer = build_tokenizer()
    rows = [{"prompt": "sort 3 1 2 =", "chosen": " 1 2 3", "rejected": " 3 2 1 1"},
            {"prompt": "sort 9 =", "chosen": " 9", "rejected": " 8 9 0 0 1"}]
    model = tiny_model("llama", "sdpa")
    tokenized = [tokenize_pair(tokenizer, r, max_length=64, index=i) for i, r in enumerate(rows)]
    expected = naive_logps(model, tokenized)
    got = pair_logps(model, tokenizer, rows, max_length=64)
    assert_close(got[0], expected[0], torch.float32, "chosen")
    assert_close(got[1], expected[1], torch.float32, "rejected")
    with pytest.raises(ValueError, match=r"pairs\[0\] is a raw row: pass the tokenizer"):
        pair_logps(model, None, rows)


def test_pair_logps_errors():
    model = tiny_model("llama", "eager")
    long_pair = TokenizedPair(tuple(range(30)), tuple(range(20)), (1,), index=42)
    with pytest.raises(ValueError, match=r"pairs\[0\] \(dataset row 42\).*50 tokens.*max_length=40"):
        pair_logps(model, None, [long_pair], max_length=40)
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a TokenizedPair or a raw preference row"):
        pair_logps(model, None, [("prompt", "chosen", "rejected")])
    with pytest.raises(ValueError, match="layout='nope'"):
        pair_logps(model, None, [long_pair], layout="nope")


def test_pair_logps_sliding_window_limit():
    model = tiny_model("gemma2", "eager")
    pair = TokenizedPair(tuple(range(90)), tuple(range(50)), (1,), index=3)
    with pytest.raises(ValueError, match="sliding_window"):
        pair_logps(model, None, [pair], max_length=1024)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_pair_logps_cuda_all_layouts(attn):
    model = tiny_model("llama", attn).cuda()
    pairs = mixed_pairs(13)
    expected = naive_logps(model, pairs)
    for layout in LAYOUTS:
        got = pair_logps(model, None, pairs, layout=layout, max_length=80, max_tokens_per_batch=260)
        assert_close(got[0], expected[0].cpu(), torch.float32, f"cuda/{layout} chosen")
        assert_close(got[1], expected[1].cpu(), torch.float32, f"cuda/{layout} rejected")


def test_rows_are_balanced_without_breaking_capacity():
    from dpo_fast.data.layouts import _balanced_rows
    from dpo_fast.data.packing import pack

    rng = random.Random(5)
    for _ in range(50):
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 60))]
        capacity = rng.randint(600, 3000)
        packed = pack(lengths, capacity, seed=None)
        rows = _balanced_rows(lengths, packed, capacity)
        assert len(rows) == len(packed)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        widest = max(sum(lengths[i] for i in r) for r in rows)
        assert widest <= capacity
        assert widest <= max(sum(lengths[i] for i in r) for r in packed)
    # A case where bin packing leaves a near-empty last row: the spread evens it out.
    lengths = [500] * 9
    rows = _balanced_rows(lengths, pack(lengths, 2000, seed=None), 2000)
    assert sorted(sum(lengths[i] for i in r) for r in rows) == [1500, 1500, 1500]
