"""Batch layouts: how B preference pairs become model inputs (`Batch`), and how pairs are grouped into batches.

Three layouts, all scored the same way (labels aligned with the outputs, one segment id per scored
position: pair i's chosen response is sequence i, its rejected response sequence B+i), and all giving
the same per-pair log-probs:

``padded``: 2B rows, chosen rows 0..B-1 then rejected rows B..2B-1, each ``prompt + completion``,
right-padded to the longest. The prompt is computed twice and padding is computed too.

``packed``: the 2B sequences of ``padded``, concatenated into as few rows as fit; position ids restart at
0 with each sequence and attention is block-diagonal causal (a sequence sees only itself). No padding
inside a row; the prompt is still computed twice.

``prefix_shared``: one row segment per pair holds the prompt once, then the chosen response, then the
rejected response; the rejected response sees the prompt but not the chosen response, and its position
ids restart right after the prompt, so each response is computed exactly as if it followed the prompt
alone. One detail: the last prompt position predicts the first completion token, and a position carries
one label. Its hidden state is the same for both responses, so we could score both first tokens from it,
but one label per position keeps every layout a plain ``(labels, segment_ids)`` pair that the fused loss
scores without special cases. So the rejected branch starts with a copy of the last prompt token (same
token, same position P-1, same context prompt[:P-1]), which carries the label rejected[0]; the original
carries chosen[0]. One extra token per pair instead of P.

For prompt ``p0 p1 p2`` (P=3), chosen ``c0 c1``, rejected ``r0 r1 r2``, pair i of B::

    tokens       p0  p1  p2  c0  c1  p2' r0  r1  r2      p2' = copy of p2, first token of the rejected branch
    position_ids  0   1   2   3   4   2   3   4   5      rejected positions restart after the prompt
    labels        -   -  c0  c1   -  r0  r1  r2   -      label t = next token of t's own sequence
    segment_ids   -   -   i   i   -  B+i B+i B+i  -      only where a label is scored
    roles         P   P   P   C   C   P   R   R   R
    document_ids  i   i   i   i   i   i   i   i   i

    attention (row = query, column = key; 1 = may attend)
             p0  p1  p2  c0  c1  p2' r0  r1  r2
        p0    1
        p1    1   1
        p2    1   1   1
        c0    1   1   1   1
        c1    1   1   1   1   1
        p2'   1   1   .   .   .   1                     the copy replaces p2 for the rejected branch
        r0    1   1   .   .   .   1   1
        r1    1   1   .   .   .   1   1   1             never a chosen token
        r2    1   1   .   .   .   1   1   1   1

Several pairs can share a row: their blocks sit one after another and attention is block-diagonal
between them (``document_ids`` differ). The same picture with the chosen and rejected blocks each
preceded by their own full prompt copy is the ``packed`` layout.

One rule gives every layout's mask (`dpo_fast.data.attention`): a query sees, within its document and up to
its own position, the most recent earlier token holding each position. In the drawing, r1 (position 4)
sees positions 0..4 through p0, p1, p2', r0, r1: p2' is the latest holder of position 2 and r0 the latest
of position 3, which hides p2 and c0; c1 is hidden by r1 itself. Rows are read left to right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .packing import pack
from .pairs import IGNORE_INDEX, LAYOUTS, ROLE_CHOSEN, ROLE_PAD, ROLE_PROMPT, ROLE_REJECTED, Batch, TokenizedPair

# One sequence fragment to lay out: tokens, their position ids, labels, roles and segment ids.
_Fragment = tuple[list[int], list[int], list[int], list[int], list[int]]


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not known; expected one of {', '.join(LAYOUTS)}")


def _check_pair(pair: TokenizedPair, position: int) -> None:
    if not isinstance(pair, TokenizedPair):
        raise TypeError(f"pairs[{position}] must be a TokenizedPair, got {type(pair).__name__}")
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if len(getattr(pair, name)) == 0:
            what = "the first completion token needs a prompt token to be predicted from" if name == "prompt_ids" \
                else "an empty response has no log-prob to score"
            raise ValueError(f"pairs[{position}] (dataset row {pair.index}) has an empty {name}: {what}")


def _sequence(prompt: Sequence[int], completion: Sequence[int], segment: int, role: int) -> _Fragment:
    """prompt + completion as one sequence from position 0; the last prompt token predicts completion[0]."""
    tokens = list(prompt) + list(completion)
    n, p = len(tokens), len(prompt)
    labels = [IGNORE_INDEX] * (p - 1) + list(completion) + [IGNORE_INDEX]
    segments = [-1] * (p - 1) + [segment] * len(completion) + [-1]
    roles = [ROLE_PROMPT] * p + [role] * len(completion)
    return tokens, list(range(n)), labels, roles, segments


def _prefix_shared(pair: TokenizedPair, chosen_segment: int, rejected_segment: int) -> _Fragment:
    """prompt + chosen + (copy of the last prompt token) + rejected; see the module docstring."""
    tokens, positions, labels, roles, segments = _sequence(pair.prompt_ids, pair.chosen_ids, chosen_segment,
                                                           ROLE_CHOSEN)
    p, r = len(pair.prompt_ids), len(pair.rejected_ids)
    tokens += [pair.prompt_ids[-1]] + list(pair.rejected_ids)
    positions += list(range(p - 1, p + r))
    labels += list(pair.rejected_ids) + [IGNORE_INDEX]
    roles += [ROLE_PROMPT] + [ROLE_REJECTED] * r
    segments += [rejected_segment] * r + [-1]
    return tokens, positions, labels, roles, segments


def unit_lengths(pairs: Sequence[TokenizedPair], layout: str) -> list[int]:
    """Token count of each unit the layout places in rows: 2B sequences (padded, packed) or B pair blocks."""
    check_layout(layout)
    if layout == "prefix_shared":
        return [len(p.prompt_ids) + len(p.chosen_ids) + 1 + len(p.rejected_ids) for p in pairs]
    return [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs] + \
        [len(p.prompt_ids) + len(p.rejected_ids) for p in pairs]


def pair_cost(pair: TokenizedPair, layout: str) -> int:
    """Tokens the pair occupies in `layout`, padding aside."""
    if layout == "prefix_shared":
        return len(pair.prompt_ids) + len(pair.chosen_ids) + 1 + len(pair.rejected_ids)
    return pair.num_tokens_padded


def build_batch(pairs: Sequence[TokenizedPair], layout: str, *, pad_id: int,
                max_tokens_per_row: int | None = None, pad_to_multiple_of: int = 1) -> Batch:
    """Lay out `pairs` as one `Batch` (tensors on the CPU, int64).

    Args:
        pairs: B >= 1 pairs, each with non-empty prompt, chosen and rejected token ids.
        layout: one of `LAYOUTS` (see the module docstring).
        pad_id: the token id written at padded positions (never attended to, never scored).
        max_tokens_per_row: for "packed" and "prefix_shared", the row capacity units are packed into
            (None: a single row holding everything); for "padded", an upper bound on a sequence's length.
            A unit longer than it raises.
        pad_to_multiple_of: the row length is rounded up to a multiple of it (FlexAttention's tile,
            `dpo_fast.data.attention.row_multiple`); the extra columns are padding.
    """
    check_layout(layout)
    if len(pairs) == 0:
        raise ValueError("pairs is empty: a batch needs at least one pair")
    for i, pair in enumerate(pairs):
        _check_pair(pair, i)
    if max_tokens_per_row is not None and max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be a positive token count or None, got {max_tokens_per_row}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    b = len(pairs)
    if layout == "prefix_shared":
        units = [_prefix_shared(p, i, b + i) for i, p in enumerate(pairs)]
        unit_docs = list(range(b))
    else:
        units = [_sequence(p.prompt_ids, p.chosen_ids, i, ROLE_CHOSEN) for i, p in enumerate(pairs)]
        units += [_sequence(p.prompt_ids, p.rejected_ids, b + i, ROLE_REJECTED) for i, p in enumerate(pairs)]
        unit_docs = list(range(b)) * 2
    lengths = [len(u[0]) for u in units]
    too_long = [i for i, n in enumerate(lengths) if max_tokens_per_row is not None and n > max_tokens_per_row]
    if too_long:
        i = too_long[0]
        pair = pairs[unit_docs[i]]
        raise ValueError(f"pairs[{unit_docs[i]}] (dataset row {pair.index}) needs {lengths[i]} tokens in one row of "
                         f"the {layout!r} layout, more than max_tokens_per_row={max_tokens_per_row}")
    if layout == "padded":
        rows = [[i] for i in range(len(units))]
    else:
        rows = _balanced_rows(lengths, pack(lengths, max_tokens_per_row or sum(lengths), seed=None),
                              max_tokens_per_row)
        # Keep units in input order inside a row: deterministic, and easy to read when debugging.
        rows = sorted(sorted(r) for r in rows)
    width = max(sum(lengths[i] for i in r) for r in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    # One int64 array per field, filled unit by unit: numpy converts lists of ints about 6x faster than
    # torch.tensor: 4 prefix-shared pairs of ~1.5k tokens took 3.0 ms, now 0.5 ms (bench_layouts.py, table 2).
    fields = np.empty((6, len(rows), width), dtype=np.int64)
    for f, value in enumerate((pad_id, 0, IGNORE_INDEX, ROLE_PAD, -1, -1)):
        fields[f] = value
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            unit = np.array(units[i], dtype=np.int64)  # tokens, positions, labels, roles, segments
            fields[:5, r, t:t + unit.shape[1]] = unit
            fields[5, r, t:t + unit.shape[1]] = unit_docs[i]
            t += unit.shape[1]
    input_ids, position_ids, labels, roles, segment_ids, document_ids = (torch.from_numpy(f) for f in fields)
    return Batch(input_ids=input_ids, labels=labels, position_ids=position_ids, segment_ids=segment_ids,
                 document_ids=document_ids, roles=roles, num_pairs=b, layout=layout,
                 pair_indices=tuple(p.index for p in pairs))


def _balanced_rows(lengths: Sequence[int], rows: list[list[int]], capacity: int | None) -> list[list[int]]:
    """The same number of rows as the bin packing found, with the units spread evenly over them.

    Every row is padded to the fullest one, so a packing that fills k - 1 rows and leaves the last half
    empty wastes half a row per row. Spreading the units longest first onto the least-filled row keeps
    the widest row near total / k. Measured by benchmarks/bench_layouts.py (2000 pairs, 16384-token
    batches, 4096-token rows), padding waste of "packed" 18.5% -> 6.4% (long prompts) and 17.7% -> 3.2%
    (short), of "prefix_shared" 15.4% -> 8.6% and 14.1% -> 9.0%. Kept only when it fits the capacity.
    """
    k = len(rows)
    if k < 2:
        return rows
    loads = [0] * k
    spread: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(k), key=lambda r: (loads[r], r))
        spread[r].append(i)
        loads[r] += lengths[i]
    widest = max(loads)
    if capacity is not None and widest > capacity:
        return rows
    return spread if widest < max(sum(lengths[i] for i in r) for r in rows) else rows


def group_pairs(pairs: Sequence[TokenizedPair], layout: str, *, max_tokens_per_batch: int,
                algorithm: str = "bfd", seed: int = 0) -> list[list[int]]:
    """Split a long list of pairs into batches (lists of indexes into `pairs`) under a token budget.

    "packed" and "prefix_shared" batches hold at most `max_tokens_per_batch` tokens of their units (rows
    built from them may add a little padding); they are bins of `dpo_fast.data.packing.pack`. "padded"
    batches are costed with their padding, 2 * B * longest sequence <= max_tokens_per_batch: pairs sorted by
    length, then cut greedily, which keeps the padding low. A pair that alone exceeds the budget raises.
    """
    check_layout(layout)
    if max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be a positive token count, got {max_tokens_per_batch}")
    for i, pair in enumerate(pairs):
        _check_pair(pair, i)
    if layout == "padded":
        longest = [max(len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids))
                   for p in pairs]
        batches: list[list[int]] = []
        for i in sorted(range(len(pairs)), key=lambda i: (longest[i], i)):
            if 2 * longest[i] > max_tokens_per_batch:
                raise ValueError(f"pairs[{i}] (dataset row {pairs[i].index}) needs {2 * longest[i]} padded tokens, "
                                 f"more than max_tokens_per_batch={max_tokens_per_batch}")
            # Sorted ascending, so the pair being added is the batch's longest.
            if batches and 2 * (len(batches[-1]) + 1) * longest[i] <= max_tokens_per_batch:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches
    costs = [pair_cost(p, layout) for p in pairs]
    for i, c in enumerate(costs):
        if c > max_tokens_per_batch:
            raise ValueError(f"pairs[{i}] (dataset row {pairs[i].index}) needs {c} tokens in the {layout!r} layout, "
                             f"more than max_tokens_per_batch={max_tokens_per_batch}")
    return [sorted(b) for b in pack(costs, max_tokens_per_batch, algorithm=algorithm, seed=seed)]
