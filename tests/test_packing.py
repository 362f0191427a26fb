"""Tests for dpo_fast.data.packing: both backends against a plain O(n * bins) reference packer, against each
other, and on the documented properties of step balancing, shuffling, errors and backend selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_fast.data import packing

HAS_CPP = packing._cpp_module() is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ packer dpo_fast._packing_cpp is not built")
BACKENDS = [pytest.param("python"), pytest.param("cpp", marks=needs_cpp)]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_pack(lengths: list[int], capacity: int, algorithm: str) -> list[list[int]]:
    """Bins in creation order, by scanning every bin for every item (the definition, not a data structure).

    bfd: the least room that fits; among equal rooms, the bin that received an item last. ffd: the lowest
    bin id that fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[int] = []
    last_change: list[int] = []  # step at which each bin last received an item
    for step, item in enumerate(order):
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[item]]
        if not fits:
            bins.append([item])
            rooms.append(capacity - lengths[item])
            last_change.append(step)
            continue
        b = min(fits, key=lambda b: (rooms[b], -last_change[b])) if algorithm == "bfd" else fits[0]
        bins[b].append(item)
        rooms[b] -= lengths[item]
        last_change[b] = step
    return bins


@st.composite
def packing_inputs(draw, max_items: int = 120):
    capacity = draw(st.one_of(st.integers(1, 40), st.integers(41, 5000)))
    shape = draw(st.sampled_from(["palette", "uniform", "long"]))
    if shape == "palette":  # few distinct lengths: ties in length and in remaining room are frequent
        palette = draw(st.lists(st.integers(0, capacity), min_size=1, max_size=4))
        lengths = draw(st.lists(st.sampled_from(palette), max_size=max_items))
    elif shape == "uniform":
        lengths = draw(st.lists(st.integers(0, capacity), max_size=max_items))
    else:  # mostly more than half the capacity: many bins with unequal loads
        lengths = draw(st.lists(st.integers(capacity // 3, capacity), max_size=max_items))
    # Scaling the same problem past 2**16 + 4 * items moves the C++ side from its dense per-room structures
    # to its ordered-set path, with the ties intact.
    scale = draw(st.sampled_from([1, 1, 100_003]))
    return [x * scale for x in lengths], capacity * scale


def loads_of(lengths, bins):
    return [sum(lengths[i] for i in b) for b in bins]


def assert_is_packing(lengths, bins, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "an item is lost or duplicated"
    assert all(b for b in bins), "empty bin"
    assert all(load <= capacity for load in loads_of(lengths, bins))


# ---------------------------------------------------------------------------------------------------------
# Correctness against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
@SETTINGS
@given(data=packing_inputs())
def test_matches_reference_packer(backend, algorithm, data):
    lengths, capacity = data
    bins = packing.pack(lengths, capacity, algorithm=algorithm, seed=None, backend=backend)
    assert bins == reference_pack(lengths, capacity, algorithm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
def test_many_bins_matches_reference(backend, algorithm):
    # More than 1024 bins: the C++ first-fit tree has to grow; ~1/3 of the items are short fillers.
    rng = np.random.default_rng(7)
    capacity = 1000
    lengths = np.concatenate([rng.integers(340, 1001, 1400), rng.integers(1, 200, 700)]).tolist()
    bins = packing.pack(lengths, capacity, algorithm=algorithm, seed=None, backend=backend)
    assert len(bins) > 1024
    assert bins == reference_pack(lengths, capacity, algorithm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
@settings(max_examples=25, deadline=None)
@given(data=packing_inputs(max_items=60), as_array=st.booleans())
def test_capacity_beyond_int32_matches_reference(backend, algorithm, data, as_array):
    # Past 2**31 - 1 the C++ side keeps lengths and rooms in int64 (list input and first-fit tree alike).
    lengths, capacity = data
    scale = 2**33 + 1
    lengths, capacity = [x * scale for x in lengths], capacity * scale
    inputs = np.array(lengths, dtype=np.int64) if as_array else lengths
    bins = packing.pack(inputs, capacity, algorithm=algorithm, seed=None, backend=backend)
    assert bins == reference_pack(lengths, capacity, algorithm)
    assert packing.pack_flat(inputs, capacity, algorithm=algorithm, seed=None, backend=backend).to_lists() == bins


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
@SETTINGS
@given(data=packing_inputs(), world_size=st.integers(1, 5), seed=st.one_of(st.none(), st.integers(-(2**70), 2**70)))
def test_is_a_packing_within_bounds(backend, algorithm, data, world_size, seed):
    lengths, capacity = data
    bins = packing.pack(lengths, capacity, algorithm=algorithm, world_size=world_size, seed=seed, backend=backend)
    assert_is_packing(lengths, bins, capacity)
    total = sum(lengths)
    lower_bound = -(-total // capacity)
    assert len(bins) >= lower_bound
    # Any-fit: a new bin opens only when nothing fits, so two bins never hold <= capacity tokens together.
    if len(bins) >= 2:
        two_lightest = sorted(loads_of(lengths, bins))[:2]
        assert sum(two_lightest) > capacity
    assert bins == packing.pack(lengths, capacity, algorithm=algorithm, world_size=world_size, seed=seed,
                                backend=backend), "not deterministic"


@needs_cpp
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
@SETTINGS
@given(data=packing_inputs(max_items=300), world_size=st.integers(1, 9),
       seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_cpp_and_python_identical(algorithm, data, world_size, seed):
    lengths, capacity = data
    kwargs = dict(algorithm=algorithm, world_size=world_size, seed=seed)
    assert packing.pack(lengths, capacity, backend="cpp", **kwargs) == packing.pack(
        lengths, capacity, backend="python", **kwargs)


@needs_cpp
def test_cpp_and_python_identical_on_a_large_input():
    rng = np.random.default_rng(3)
    lengths = np.clip(rng.lognormal(np.log(300), 1.0, 20_000), 1, 4096).astype(np.int64).tolist()
    for algorithm, world_size, seed in [("bfd", 1, 5), ("ffd", 1, None), ("bfd", 8, 11), ("ffd", 3, 2**63 + 5)]:
        kwargs = dict(algorithm=algorithm, world_size=world_size, seed=seed)
        assert packing.pack(lengths, 4096, backend="cpp", **kwargs) == packing.pack(
            lengths, 4096, backend="python", **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Step order: balancing across ranks and the seeded shuffle


def split_groups(bins, world_size):
    full = len(bins) // world_size
    return [bins[g * world_size:(g + 1) * world_size] for g in range(full)], bins[full * world_size:]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=packing_inputs(), world_size=st.integers(2, 6))
def test_unshuffled_steps_are_load_sorted_groups(backend, data, world_size):
    lengths, capacity = data
    bins = packing.pack(lengths, capacity, world_size=world_size, seed=None, backend=backend)
    created = packing.pack(lengths, capacity, seed=None, backend=backend)
    assert sorted(map(tuple, bins)) == sorted(map(tuple, created)), "balancing changed the bins themselves"
    groups, rest = split_groups(bins, world_size)
    group_loads = [loads_of(lengths, g) for g in groups] + ([loads_of(lengths, rest)] if rest else [])
    for earlier, later in itertools.pairwise(group_loads):
        assert min(earlier) >= max(later), "groups are not consecutive in load order"
    for g, group in enumerate(group_loads[: len(groups)]):
        expected = sorted(group, reverse=(g % 2 == 0))
        assert group == expected, "every other group is reversed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_unshuffled_steps_on_unequal_loads(backend, world_size):
    rng = np.random.default_rng(world_size)
    lengths = rng.integers(51, 101, 40).tolist()  # one item per bin: 40 bins, loads all over the range
    bins = packing.pack(lengths, 100, world_size=world_size, seed=None, backend=backend)
    loads = loads_of(lengths, bins)
    ranked = sorted(loads, reverse=True)
    full = len(loads) // world_size * world_size
    for g in range(full // world_size):
        group = ranked[g * world_size:(g + 1) * world_size]
        assert loads[g * world_size:(g + 1) * world_size] == (group if g % 2 == 0 else group[::-1])
    assert loads[full:] == ranked[full:]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=packing_inputs(), world_size=st.integers(1, 6), seed=st.integers(0, 2**64 - 1))
def test_shuffle_permutes_whole_steps(backend, data, world_size, seed):
    lengths, capacity = data
    plain = packing.pack(lengths, capacity, world_size=world_size, seed=None, backend=backend)
    shuffled = packing.pack(lengths, capacity, world_size=world_size, seed=seed, backend=backend)
    plain_groups, plain_rest = split_groups(plain, world_size)
    shuffled_groups, shuffled_rest = split_groups(shuffled, world_size)
    assert shuffled_rest == plain_rest, "the short last group must stay last and unchanged"
    assert sorted(shuffled_groups) == sorted(plain_groups), "a step was split or changed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_give_different_step_orders(backend):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 400).tolist()
    orders = {tuple(map(tuple, packing.pack(lengths, 128, world_size=2, seed=s, backend=backend))) for s in range(5)}
    assert len(orders) == 5


def test_balancing_beats_creation_order_on_step_spread():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(200), 1.0, 3000), 1, 2048).astype(np.int64).tolist()
    balanced = packing.pack(lengths, 2048, world_size=4, seed=0)
    unbalanced = packing.pack(lengths, 2048, world_size=1, seed=None)
    spread_balanced = packing.pack_stats(lengths, balanced, 2048, world_size=4).max_step_spread
    spread_unbalanced = packing.pack_stats(lengths, unbalanced, 2048, world_size=4).max_step_spread
    assert spread_balanced < spread_unbalanced


def test_splitmix64_reference_values():
    # First outputs of splitmix64 from state 0, as printed by the authors' reference C implementation.
    assert list(itertools.islice(packing.splitmix64(0), 3)) == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@needs_cpp
@given(seed=st.integers(0, 2**64 - 1))
@settings(max_examples=30, deadline=None)
def test_splitmix64_same_in_cpp(seed):
    assert packing._cpp_module().splitmix64(seed, 8) == list(itertools.islice(packing.splitmix64(seed), 8))


# ---------------------------------------------------------------------------------------------------------
# Inputs, edge cases and errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_containers_agree(backend):
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 60, 200)
    expected = packing.pack(lengths.tolist(), 64, world_size=2, seed=3, backend=backend)
    variants = [tuple(lengths.tolist()), iter(lengths.tolist()), list(lengths), lengths, lengths.astype(np.int32),
                lengths.astype(np.uint8), lengths.astype(np.uint64), lengths[::-1][::-1]]
    for variant in variants:
        assert packing.pack(variant, 64, world_size=2, seed=3, backend=backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_lengths(backend):
    assert packing.pack([], 10, backend=backend) == []
    assert packing.pack(np.zeros(0, dtype=np.int64), 10, backend=backend) == []
    assert packing.pack([0, 0, 0], 1, seed=None, backend=backend) == [[0, 1, 2]]
    assert packing.pack([0, 5, 0], 5, seed=None, backend=backend) == reference_pack([0, 5, 0], 5, "bfd")


def error_message(backend, *args, pack=packing.pack, **kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        pack(*args, backend=backend, **kwargs)
    return info.type, str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item_longer_than_capacity_names_item_and_length(backend):
    kind, message = error_message(backend, [3, 4, 12, 30], 10)
    assert kind is ValueError
    assert "item 2" in message and "length 12" in message and "capacity 10" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lengths(backend):
    kind, message = error_message(backend, [3, -1, 12], 10)
    assert kind is ValueError and "lengths[1]" in message and "-1" in message
    kind, message = error_message(backend, [3, 2.5], 10)
    assert kind is TypeError and "lengths[1]" in message and "float" in message
    kind, message = error_message(backend, [3, 2**70], 10)
    assert kind is ValueError and "item 1" in message
    kind, message = error_message(backend, np.ones((2, 2), dtype=np.int64), 10)
    assert kind is ValueError and "1-D" in message
    kind, message = error_message(backend, np.ones(3), 10)
    assert kind is TypeError and "float64" in message


BAD_LENGTHS = [[3, 11, -2], [3, -2, 11], [1, np.int64(20)], [1, "7"], [4, 2.0, -1], np.array([1, -4, 30]),
               np.array([1, 30, -4], dtype=np.int32), np.array([2, 11], dtype=np.uint64), [2**64, 1], (5, -1)]


@needs_cpp
@pytest.mark.parametrize("lengths", BAD_LENGTHS)
def test_error_messages_identical_across_backends(lengths):
    assert error_message("cpp", lengths, 10) == error_message("python", lengths, 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", BAD_LENGTHS)
def test_flat_api_raises_the_same_errors(backend, lengths):
    assert error_message(backend, lengths, 10, pack=packing.pack_flat) == error_message(backend, lengths, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_are_named(backend):
    for capacity in (0, -5):
        kind, message = error_message(backend, [1], capacity)
        assert kind is ValueError and "capacity" in message
    for capacity in (8.0, True, "8"):
        kind, message = error_message(backend, [1], capacity)
        assert kind is TypeError and "capacity" in message
    kind, message = error_message(backend, [1], 8, algorithm="nfd")
    assert kind is ValueError and "algorithm" in message and "nfd" in message
    kind, message = error_message(backend, [1], 8, world_size=0)
    assert kind is ValueError and "world_size" in message
    kind, message = error_message(backend, [1], 8, seed=1.5)
    assert kind is TypeError and "seed" in message


# ---------------------------------------------------------------------------------------------------------
# Flat API: pack_flat / PackedBins


def assert_flat_equals(flat: packing.PackedBins, bins: list[list[int]], num_items: int):
    assert flat.items.dtype == np.int64 and flat.offsets.dtype == np.int64
    assert flat.items.shape == (num_items,) and flat.offsets.shape == (len(bins) + 1,)
    assert len(flat) == len(bins)
    assert flat.to_lists() == bins
    assert [flat.bin(i).tolist() for i in range(len(flat))] == bins
    assert flat.sizes().tolist() == [len(b) for b in bins]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
@SETTINGS
@given(data=packing_inputs(), world_size=st.integers(1, 5), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_flat_api_equals_pack(backend, algorithm, data, world_size, seed):
    lengths, capacity = data
    kwargs = dict(algorithm=algorithm, world_size=world_size, seed=seed, backend=backend)
    flat = packing.pack_flat(lengths, capacity, **kwargs)
    assert_flat_equals(flat, packing.pack(lengths, capacity, **kwargs), len(lengths))
    if seed is None and world_size == 1:
        assert flat.to_lists() == reference_pack(lengths, capacity, algorithm)


@needs_cpp
@pytest.mark.parametrize("algorithm", packing.ALGORITHMS)
@SETTINGS
@given(data=packing_inputs(max_items=300), world_size=st.integers(1, 9),
       seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)), as_array=st.booleans())
def test_flat_api_cpp_and_python_identical(algorithm, data, world_size, seed, as_array):
    lengths, capacity = data
    if as_array:
        lengths = np.array(lengths, dtype=np.int64)
    kwargs = dict(algorithm=algorithm, world_size=world_size, seed=seed)
    cpp = packing.pack_flat(lengths, capacity, backend="cpp", **kwargs)
    python = packing.pack_flat(lengths, capacity, backend="python", **kwargs)
    np.testing.assert_array_equal(cpp.items, python.items)
    np.testing.assert_array_equal(cpp.offsets, python.offsets)


@needs_cpp
def test_flat_api_cpp_and_python_identical_on_a_large_input():
    rng = np.random.default_rng(4)
    array = np.clip(rng.lognormal(np.log(300), 1.0, 20_000), 1, 4096).astype(np.int64)
    for algorithm, world_size, seed in [("bfd", 1, 5), ("ffd", 1, None), ("bfd", 8, 11), ("ffd", 3, 2**63 + 5)]:
        kwargs = dict(algorithm=algorithm, world_size=world_size, seed=seed)
        python = packing.pack_flat(array, 4096, backend="python", **kwargs)
        for variant in (array, array.astype(np.int32), array.tolist()):
            cpp = packing.pack_flat(variant, 4096, backend="cpp", **kwargs)
            np.testing.assert_array_equal(cpp.items, python.items)
            np.testing.assert_array_equal(cpp.offsets, python.offsets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_api_input_containers_agree(backend):
    rng = np.random.default_rng(6)
    lengths = rng.integers(0, 60, 300)
    expected = packing.pack(lengths.tolist(), 64, world_size=2, seed=3, backend=backend)
    variants = [lengths.tolist(), tuple(lengths.tolist()), iter(lengths.tolist()), lengths, lengths.astype(np.int32),
                lengths.astype(">i8"), lengths.astype(">i4"), lengths.astype(np.uint16), lengths.astype(np.uint64),
                np.repeat(lengths, 2)[::2], lengths.astype(np.int32)[::-1][::-1]]
    for variant in variants:
        flat = packing.pack_flat(variant, 64, world_size=2, seed=3, backend=backend)
        assert flat.to_lists() == expected, f"{type(variant).__name__} {getattr(variant, 'dtype', '')}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_api_empty_input(backend):
    for empty in ([], np.zeros(0, dtype=np.int32)):
        flat = packing.pack_flat(empty, 10, backend=backend)
        assert len(flat) == 0 and flat.items.shape == (0,) and flat.offsets.tolist() == [0]
        assert flat.to_lists() == []


def test_packed_bins_checks_and_indexing():
    flat = packing.PackedBins(np.array([2, 0, 1, 3], dtype=np.int64), np.array([0, 1, 3, 4], dtype=np.int64))
    assert flat.bin(-1).tolist() == [3] and flat.bin(1).tolist() == [0, 1]
    with pytest.raises(IndexError, match="bin 3"):
        flat.bin(3)
    with pytest.raises(TypeError, match="items"):
        packing.PackedBins(np.array([0, 1], dtype=np.int32), np.array([0, 2], dtype=np.int64))
    with pytest.raises(TypeError, match="offsets"):
        packing.PackedBins(np.array([0, 1], dtype=np.int64), [0, 2])
    with pytest.raises(ValueError, match="end at len"):
        packing.PackedBins(np.array([0, 1], dtype=np.int64), np.array([0, 1], dtype=np.int64))
    with pytest.raises(ValueError, match="start at 0"):
        packing.PackedBins(np.array([0, 1], dtype=np.int64), np.array([1, 2], dtype=np.int64))


def test_pack_stats_accepts_packed_bins():
    lengths = [5, 3, 7, 2, 4]
    flat = packing.pack_flat(lengths, 8, seed=None)
    assert packing.pack_stats(lengths, flat, 8) == packing.pack_stats(lengths, flat.to_lists(), 8)


# ---------------------------------------------------------------------------------------------------------
# Backend selection


def test_backend_keyword_and_environment(monkeypatch):
    monkeypatch.delenv(packing.BACKEND_ENV, raising=False)
    assert packing.backend() == ("cpp" if HAS_CPP else "python")
    monkeypatch.setenv(packing.BACKEND_ENV, "python")  # read at call time, after import
    assert packing.backend() == "python"
    monkeypatch.setenv(packing.BACKEND_ENV, "fortran")
    with pytest.raises(ValueError, match=packing.BACKEND_ENV):
        packing.backend()
    with pytest.raises(ValueError, match="backend"):
        packing.pack([1], 4, backend="fortran")
    assert packing.pack([1, 2], 4, backend="python") == [[1, 0]]  # the keyword overrides the variable


def test_environment_forces_python_and_cpp_is_not_called(monkeypatch):
    class Exploding:
        def __getattr__(self, name):
            raise AssertionError(f"C++ backend used ({name})")

    monkeypatch.setattr(packing, "_cpp_module", lambda: Exploding())
    monkeypatch.setenv(packing.BACKEND_ENV, "python")
    assert packing.pack([5, 3, 7], 8, seed=None) == reference_pack([5, 3, 7], 8, "bfd")
    assert packing.pack_flat(np.array([5, 3, 7]), 8, seed=None).to_lists() == reference_pack([5, 3, 7], 8, "bfd")
    monkeypatch.delenv(packing.BACKEND_ENV)
    with pytest.raises(AssertionError, match="C\\+\\+ backend used"):
        packing.pack([5, 3, 7], 8)
    with pytest.raises(AssertionError, match="C\\+\\+ backend used"):
        packing.pack_flat([5, 3, 7], 8)


def test_missing_extension_falls_back(monkeypatch):
    monkeypatch.setattr(packing, "_cpp_module", lambda: None)
    monkeypatch.delenv(packing.BACKEND_ENV, raising=False)
    assert packing.backend() == "python"
    assert packing.pack([5, 3, 7], 8, seed=None) == reference_pack([5, 3, 7], 8, "bfd")
    with pytest.raises(RuntimeError, match="not built"):
        packing.pack([1], 4, backend="cpp")
    monkeypatch.setenv(packing.BACKEND_ENV, "cpp")
    with pytest.raises(RuntimeError, match=packing.BACKEND_ENV):
        packing.backend()


# ---------------------------------------------------------------------------------------------------------
# pack_stats


@SETTINGS
@given(data=packing_inputs(), world_size=st.integers(1, 4))
def test_pack_stats_against_direct_computation(data, world_size):
    lengths, capacity = data
    bins = packing.pack(lengths, capacity, world_size=world_size, seed=1)
    stats = packing.pack_stats(lengths, bins, capacity, world_size=world_size)
    total = sum(lengths)
    assert stats.num_items == len(lengths) and stats.num_bins == len(bins) and stats.total_tokens == total
    assert stats.lower_bound * capacity >= total > (stats.lower_bound - 1) * capacity
    assert stats.padding_waste == len(bins) * capacity - total
    if bins:
        assert stats.fill_efficiency == pytest.approx(total / (len(bins) * capacity), rel=1e-12)
        assert stats.lower_bound_ratio == pytest.approx(stats.lower_bound / len(bins), rel=1e-12)
    loads = loads_of(lengths, bins)
    groups = [loads[g:g + world_size] for g in range(0, len(loads) - world_size + 1, world_size)]
    spread = max((max(g) - min(g) for g in groups), default=0) if world_size > 1 else 0
    assert stats.max_step_spread == pytest.approx(spread / capacity, abs=1e-15)


def test_pack_stats_rejects_a_wrong_packing():
    lengths = [4, 5, 6]
    with pytest.raises(ValueError, match="more than once"):
        packing.pack_stats(lengths, [[0, 1], [1, 2]], 20)
    with pytest.raises(ValueError, match="item 2 is in no bin"):
        packing.pack_stats(lengths, [[0, 1]], 20)
    with pytest.raises(ValueError, match="outside"):
        packing.pack_stats(lengths, [[0, 1, 2, 3]], 20)
    with pytest.raises(ValueError, match=r"bins\[1\] holds 11 tokens > capacity 10"):
        packing.pack_stats(lengths, [[0], [1, 2]], 10)
    with pytest.raises(ValueError, match="capacity"):
        packing.pack_stats(lengths, [[0, 1, 2]], 0)
