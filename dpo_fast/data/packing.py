"""Packing preference pairs into fixed-capacity bins (rows of a packed batch).

An item is one preference pair, and its length is the number of tokens the pair takes in the chosen
layout (prompt + chosen + rejected for "prefix_shared", the prompt twice for "packed"). Because the
packer only ever sees whole pairs, the chosen and the rejected response of a pair always land in the
same bin, which the DPO loss needs (it compares the two within a row's segments).

    lengths  = [5, 3, 7, 2, 4]           capacity = 8
    order    = items by (-length, index): 2(7) 0(5) 4(4) 1(3) 3(2)
    bfd      = [[2], [0, 1], [4, 3]]      loads 7, 8, 6

Algorithms (both O(n log n); ties are broken the same way by both backends):
  "bfd"  best fit decreasing: each item goes to the bin with the least room that still fits it; among
         bins with equal room, the one that received an item last; a new bin only when no bin fits.
  "ffd"  first fit decreasing: each item goes to the lowest bin id that fits it.
Items are placed longest first, ties by index; inside a bin items keep their insertion order.
Why "received an item last" among equal rooms (it was "lowest bin id"): it is a stack per room value,
O(1) and allocation-free in C++, where the lowest id needed a heap per room value (C++ placement of the
benchmark's 10^6 items 21 ms -> 15 ms, before the run batching below took it to 2.4 ms). Which of the bins
with equal room takes an item never changes the rooms that remain, so any such rule gives the same number of
bins and the same loads. The C++ side also places a run of equal lengths a bin at a time (a bin keeps
taking items of one length while they fit, which is what both rules choose anyway).

Step order (`world_size`, `seed`): a training step takes `world_size` consecutive bins, one per
data-parallel rank. With world_size > 1 the bins are sorted by load and cut into groups of world_size
consecutive bins, so the ranks of a step carry near-equal tokens and none waits for the others; every
other group is reversed so that no rank always gets the heaviest bin. No empty bin is ever invented: when
the number of bins is not a multiple of world_size, the `len(bins) % world_size` lightest bins come last
as a short final group, and the caller decides whether to drop it, pad it or pack it with the next epoch.
An int `seed` then shuffles the order of the full groups (splitmix64 + Fisher-Yates, the same numbers in
both backends); `seed=None` keeps the unshuffled order: creation order for world_size=1, heaviest group
first for world_size > 1.

    world_size=2, loads by creation  [8, 3, 7, 8, 6]
    sorted by load (ties: creation)  b0:8 b3:8 | b2:7 b4:6 | b1:3
    groups, odd ones reversed        [b0 b3] [b4 b2] [b1]   <- short last group, never shuffled
    seed=s                           the two full groups in a seeded order, then [b1]

Output: `pack` returns the bins as lists of item indexes; `pack_flat` returns the same bins as a
`PackedBins`, two int64 numpy arrays: `items` (the item indexes, bin after bin in output order) and
`offsets` (num_bins + 1 entries, bin i is items[offsets[i]:offsets[i + 1]]), the layout of `cu_seqlens`.
The flat API exists because the lists cost more than the packing: at 10^6 pairs (bfd, capacity 8192,
2-core VM, benchmarks/results/packing-cpu.md) C++ `pack_flat` takes 20 ms from a list (18 ms from an int64
array), C++ `pack` 45 ms, the difference being the 10^6 Python ints and 10^5 lists it creates; the
pure-Python backend takes 1.3-1.4 s either way. Prefer `pack_flat` for large inputs, with the lengths as an
int32 or int64 numpy array, which the C++ side reads in place.

    pack_flat([5, 3, 7, 2, 4], 8, seed=None)    items [2, 0, 1, 4, 3]   offsets [0, 1, 3, 5]

Backends: the C++ extension `dpo_fast._packing_cpp` when it was built, else the pure-Python fallback,
which returns identical bins. `DPO_FAST_PACKING_BACKEND=python|cpp|auto` (read at each call) overrides
the choice, and the `backend=` keyword of `pack` and `pack_flat` overrides both.
"""

from __future__ import annotations

import functools
import gc
import itertools
import operator
import os
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

ALGORITHMS = ("bfd", "ffd")
BACKENDS = ("cpp", "python")
BACKEND_ENV = "DPO_FAST_PACKING_BACKEND"

_MASK64 = (1 << 64) - 1
_MAX_INT64 = (1 << 63) - 1
_MAX_ITEMS = (1 << 31) - 1


@functools.cache
def _cpp_module() -> ModuleType | None:
    try:
        from .. import _packing_cpp
    except ImportError:
        return None
    return _packing_cpp


def _resolve_backend(requested: str | None) -> str:
    source = "backend"
    if requested is None:
        requested = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        source = BACKEND_ENV
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"{source}={requested!r} is not known; expected 'cpp', 'python' or 'auto'")
    available = _cpp_module() is not None
    if requested == "auto":
        return "cpp" if available else "python"
    if requested == "cpp" and not available:
        raise RuntimeError(
            f"{source}='cpp' but the C++ packer dpo_fast._packing_cpp is not built; reinstall with a C++17 "
            "compiler and pybind11 (`pip install -e .`) or use 'python'"
        )
    return requested


def backend() -> str:
    """The backend `pack` uses now: "cpp" or "python" (honours DPO_FAST_PACKING_BACKEND)."""
    return _resolve_backend(None)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _checked_lengths(lengths: Iterable[object], capacity: int) -> list[int]:
    """Plain-int copy of `lengths`; the first bad item (in index order) raises. Same messages as the C++ side."""
    out: list[int] = []
    for i, raw in enumerate(lengths):
        try:
            length = operator.index(raw)
        except TypeError:
            raise TypeError(f"lengths[{i}] must be an int, got {type(raw).__name__}") from None
        if length < 0:
            raise ValueError(f"lengths[{i}] = {length} is negative; every length must be >= 0")
        if length > capacity:
            raise ValueError(
                f"item {i} has length {length} > capacity {capacity}: a pair must fit whole in one bin; "
                "raise capacity or truncate/drop the pair"
            )
        out.append(length)
    if len(out) > _MAX_ITEMS:
        raise ValueError(f"lengths has {len(out)} items; at most {_MAX_ITEMS} are supported")
    return out


def _prepared(lengths: object, capacity: object, algorithm: str, world_size: object, seed: object,
              backend: str | None) -> tuple[object, int, int, bool, int, str]:
    """The arguments of `pack`/`pack_flat` checked and normalised: (lengths, capacity, world_size, shuffle,
    seed64, backend). lengths stays a numpy array only for the C++ backend, as int32 or int64 C-contiguous
    (read in place); otherwise it becomes a list or tuple."""
    capacity = _as_int("capacity", capacity)
    if not 0 < capacity <= _MAX_INT64:
        raise ValueError(f"capacity must be a positive int below 2**63, got {capacity}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not known; expected one of {', '.join(ALGORITHMS)}")
    world_size = _as_int("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size}")
    shuffle = seed is not None
    seed64 = _as_int("seed", seed) & _MASK64 if shuffle else 0
    chosen = _resolve_backend(backend)
    if isinstance(lengths, np.ndarray):
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D, got an array of shape {tuple(lengths.shape)}")
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths must hold integers, got an array of dtype {lengths.dtype}")
        if chosen == "python" or lengths.dtype == np.uint64:  # uint64 values could wrap in int64
            lengths = lengths.tolist()
        elif lengths.dtype in (np.int32, np.int64):  # native byte order only (dtype equality checks it)
            lengths = np.ascontiguousarray(lengths)  # no copy when it already is
        else:
            lengths = lengths.astype(np.int64)
    elif not isinstance(lengths, (list, tuple)):
        lengths = list(lengths)
    return lengths, capacity, world_size, shuffle, seed64, chosen


def _call_cpp(entry: str, lengths: object, capacity: int, algorithm: str, world_size: int, shuffle: bool,
              seed64: int) -> object:
    function = getattr(_cpp_module(), entry)
    try:
        return function(lengths, capacity, algorithm, world_size, shuffle, seed64)
    except TypeError:
        # Not plain ints (numpy scalars, floats, ints beyond int64): check them here, which raises the
        # fallback's exact message for a bad item, then retry with plain ints.
        return function(_checked_lengths(lengths, capacity), capacity, algorithm, world_size, shuffle, seed64)


def pack(
    lengths: Sequence[int] | np.ndarray | Iterable[int],
    capacity: int,
    *,
    algorithm: str = "bfd",
    world_size: int = 1,
    seed: int | None = 0,
    backend: str | None = None,
) -> list[list[int]]:
    """Packs items (preference pairs) into bins of at most `capacity` tokens.

    lengths: tokens per item, one per preference pair in the chosen layout (a pair is never split, so its
        chosen and rejected responses share a bin). A list/tuple/iterable of ints or a 1-D integer array.
    capacity: tokens per bin (the packed row length).
    algorithm: "bfd" (best fit decreasing) or "ffd" (first fit decreasing); see the module docstring.
    world_size: data-parallel ranks; > 1 orders the bins so that each group of world_size consecutive bins
        (one step) has near-equal token totals, the short remainder group last (no empty bins are added).
    seed: shuffles the order of the full groups (steps) deterministically; None keeps the unshuffled order.
    backend: "cpp", "python" or None (DPO_FAST_PACKING_BACKEND, else "cpp" when built).

    Returns the bins as lists of item indexes. Raises ValueError naming the item for a negative length or
    one longer than capacity, and naming the argument for a bad capacity, algorithm or world_size.
    `pack_flat` returns the same bins as two numpy arrays, several times faster on large inputs.
    """
    lengths, capacity, world_size, shuffle, seed64, chosen = _prepared(lengths, capacity, algorithm, world_size,
                                                                       seed, backend)
    if chosen == "cpp":
        return _call_cpp("pack", lengths, capacity, algorithm, world_size, shuffle, seed64)
    items = _checked_lengths(lengths, capacity)
    return _pack_python(items, capacity, algorithm, world_size, shuffle, seed64)


@dataclass(frozen=True)
class PackedBins:
    """Bins as flat arrays (CSR): the items of bin i are items[offsets[i]:offsets[i + 1]].

    items: int64 item indexes, bin after bin in output (step) order, insertion order inside a bin.
    offsets: int64, num_bins + 1 entries, offsets[0] == 0 and offsets[-1] == len(items).
    """

    items: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        for name in ("items", "offsets"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != np.int64:
                raise TypeError(f"PackedBins.{name} must be a 1-D int64 numpy array")
        if len(self.offsets) == 0 or self.offsets[0] != 0 or self.offsets[-1] != len(self.items):
            raise ValueError(f"PackedBins.offsets must start at 0 and end at len(items) = {len(self.items)}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def bin(self, i: int) -> np.ndarray:
        """The item indexes of bin i (a view)."""
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"bin {i} is out of range for {len(self)} bins")
        i %= len(self)
        return self.items[self.offsets[i]:self.offsets[i + 1]]

    def sizes(self) -> np.ndarray:
        """Items per bin."""
        return np.diff(self.offsets)

    def to_lists(self) -> list[list[int]]:
        """The bins as `pack` returns them."""
        flat = self.items.tolist()
        bounds = self.offsets.tolist()
        return [flat[start:stop] for start, stop in zip(bounds, bounds[1:])]


def pack_flat(
    lengths: Sequence[int] | np.ndarray | Iterable[int],
    capacity: int,
    *,
    algorithm: str = "bfd",
    world_size: int = 1,
    seed: int | None = 0,
    backend: str | None = None,
) -> PackedBins:
    """`pack` with the bins as two numpy arrays instead of lists: same arguments, same errors, and
    `pack_flat(...).to_lists() == pack(...)` for the same arguments. An int32 or int64 C-contiguous array
    of lengths is read in place by the C++ backend.

    Why it exists: the lists of `pack` hold one Python int per item, and creating 10^6 of them costs more
    than the C++ packing itself (see the module docstring); here the C++ side writes the arrays directly.
    """
    lengths, capacity, world_size, shuffle, seed64, chosen = _prepared(lengths, capacity, algorithm, world_size,
                                                                       seed, backend)
    if chosen == "cpp":
        items, offsets = _call_cpp("pack_flat", lengths, capacity, algorithm, world_size, shuffle, seed64)
        return PackedBins(items, offsets)
    checked = _checked_lengths(lengths, capacity)
    bins = _pack_python(checked, capacity, algorithm, world_size, shuffle, seed64)
    items = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(checked))
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, bins), dtype=np.int64, count=len(bins)), out=offsets[1:])
    return PackedBins(items, offsets)


# ----------------------------------------------------------------------------------------------------------
# Pure-Python fallback. Every choice mirrors csrc/packing.cpp so that the two return identical bins.


def _pack_python(lengths: list[int], capacity: int, algorithm: str, world_size: int, shuffle: bool,
                 seed: int) -> list[list[int]]:
    # As in the C++ side, the cyclic GC is paused while the bins (lists of ints, no cycles) are built.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        # list.sort is stable, also with reverse=True: equal lengths keep increasing index.
        order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
        place = _first_fit if algorithm == "ffd" else _best_fit
        bins, loads = place(lengths, order, capacity)
        return [bins[b] for b in _bin_order(loads, world_size, shuffle, seed)]
    finally:
        if gc_was_enabled:
            gc.enable()


def _best_fit(lengths: list[int], order: list[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """Least room that fits, among equals the bin that reached that room last: a stack of bin ids per
    remaining capacity, plus the sorted list of remaining capacities whose stack is non-empty."""
    bins: list[list[int]] = []
    loads: list[int] = []
    min_length = lengths[order[-1]] if order else 0
    stacks: dict[int, list[int]] = {}
    open_rooms: list[int] = []
    for item in order:
        length = lengths[item]
        pos = bisect_left(open_rooms, length)
        if pos == len(open_rooms):
            bin_id = len(bins)
            bins.append([item])
            loads.append(length)
            left = capacity - length
        else:
            room = open_rooms[pos]
            stack = stacks[room]
            bin_id = stack.pop()
            if not stack:
                del open_rooms[pos]
                del stacks[room]
            bins[bin_id].append(item)
            loads[bin_id] += length
            left = room - length
        # Items come longest first: a bin with less room than the shortest item can never be chosen again.
        if left >= min_length:
            stack = stacks.get(left)
            if stack is None:
                stacks[left] = [bin_id]
                insort(open_rooms, left)
            else:
                stack.append(bin_id)
    return bins, loads


def _first_fit(lengths: list[int], order: list[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """Lowest bin id that fits: a max segment tree of remaining capacity over bins (-1: no bin yet)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    size = 1
    while size < len(order):
        size <<= 1
    tree = [-1] * (2 * size)
    for item in order:
        length = lengths[item]
        if tree[1] < length:
            bin_id = len(bins)
            bins.append([item])
            loads.append(length)
            node = size + bin_id
            tree[node] = capacity - length
        else:
            node = 1
            while node < size:
                node <<= 1
                if tree[node] < length:
                    node += 1
            bin_id = node - size
            bins[bin_id].append(item)
            loads[bin_id] += length
            tree[node] -= length
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            best = left if left > right else right
            if tree[node] == best:
                break
            tree[node] = best
            node >>= 1
    return bins, loads


def splitmix64(seed: int) -> Iterator[int]:
    """The splitmix64 stream (Steele, Lea and Flood 2014) seeded with `seed` mod 2**64."""
    state = seed & _MASK64
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


def _bin_order(loads: list[int], world_size: int, shuffle: bool, seed: int) -> list[int]:
    ranked = list(range(len(loads)))
    if world_size > 1:
        ranked.sort(key=loads.__getitem__, reverse=True)
    num_groups = len(loads) // world_size
    groups = [ranked[g * world_size:(g + 1) * world_size] for g in range(num_groups)]
    for g in range(1, num_groups, 2):
        groups[g].reverse()
    if shuffle:
        rng = splitmix64(seed)
        for i in range(num_groups - 1, 0, -1):
            j = next(rng) % (i + 1)
            groups[i], groups[j] = groups[j], groups[i]
    out = [b for group in groups for b in group]
    out.extend(ranked[num_groups * world_size:])
    return out


# ----------------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class PackStats:
    """How well `bins` pack `lengths` into rows of `capacity` tokens.

    total_tokens: sum of all lengths. lower_bound: ceil(total_tokens / capacity), no packing has fewer bins.
    fill_efficiency: total_tokens / (num_bins * capacity), the non-padding share of the packed rows.
    padding_waste: num_bins * capacity - total_tokens, padding tokens if every row is padded to capacity.
    lower_bound_ratio: lower_bound / num_bins, 1.0 when the packing is provably optimal.
    max_step_spread: with world_size > 1, the largest (max - min) load among the bins of one full step,
        divided by capacity (0.0 for world_size=1).
    """

    num_items: int
    num_bins: int
    capacity: int
    total_tokens: int
    lower_bound: int
    fill_efficiency: float
    padding_waste: int
    lower_bound_ratio: float
    max_step_spread: float


def pack_stats(lengths: Sequence[int] | np.ndarray, bins: Sequence[Sequence[int]] | PackedBins, capacity: int, *,
               world_size: int = 1) -> PackStats:
    """Checks that `bins` (lists, or the PackedBins of `pack_flat`) is a packing of `lengths` (every item
    exactly once, no bin over capacity) and measures it. Raises ValueError naming the bin or item otherwise.
    Empty input: fill_efficiency 1.0."""
    if isinstance(bins, PackedBins):
        bins = bins.to_lists()
    capacity = _as_int("capacity", capacity)
    if capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity}")
    world_size = _as_int("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size}")
    items = lengths.tolist() if isinstance(lengths, np.ndarray) else [operator.index(x) for x in lengths]
    seen = [False] * len(items)
    loads = []
    for b, members in enumerate(bins):
        load = 0
        for item in members:
            item = operator.index(item)
            if not 0 <= item < len(items):
                raise ValueError(f"bins[{b}] holds item {item}, outside [0, {len(items)})")
            if seen[item]:
                raise ValueError(f"item {item} appears more than once (again in bins[{b}])")
            seen[item] = True
            load += items[item]
        if load > capacity:
            raise ValueError(f"bins[{b}] holds {load} tokens > capacity {capacity}")
        loads.append(load)
    if not all(seen):
        raise ValueError(f"item {seen.index(False)} is in no bin")
    total = sum(items)
    num_bins = len(loads)
    lower_bound = -(-total // capacity)
    slots = num_bins * capacity
    spread = 0
    if world_size > 1:
        for g in range(num_bins // world_size):
            step = loads[g * world_size:(g + 1) * world_size]
            spread = max(spread, max(step) - min(step))
    return PackStats(
        num_items=len(items),
        num_bins=num_bins,
        capacity=capacity,
        total_tokens=total,
        lower_bound=lower_bound,
        fill_efficiency=total / slots if slots else 1.0,
        padding_waste=slots - total,
        lower_bound_ratio=lower_bound / num_bins if num_bins else 1.0,
        max_step_spread=spread / capacity,
    )


__all__ = ["ALGORITHMS", "BACKENDS", "BACKEND_ENV", "PackStats", "PackedBins", "backend", "pack", "pack_flat",
           "pack_stats",
           "splitmix64"]
