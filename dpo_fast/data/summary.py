"""The one-screen summary of the training data a run prints before its first step.

It says what loading and tokenization did to the rows, so that a run on silently truncated prompts or
skipped rows does not look like a run on the data the user meant:

    data: prefs.jsonl (explicit format)
      rows read        1000
      pairs kept        990
      skipped            10: 7 invalid JSON, 3 empty chosen completion
      duplicates          2 pairs identical to an earlier one
      truncated          64 pairs (6.5%): 60 prompts (longest 2210 tokens), 9 completions (longest 1400),
                            to max_length=1024
      tokens per pair    mean 412, p95 901, max 1024 (prompt + chosen + rejected)
      layout           prefix_shared: 7.1% of the batch positions are padding (first 64 micro-batches)
    warning: 6.5% of the pairs were truncated to max_length=1024 (over 5%): raise --max-length ...
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .pairs import TokenizedPair
from .tokenization import TokenizeStats

# Above this share of truncated pairs the summary warns: the model trains on cut prompts/completions.
TRUNCATION_WARNING_FRACTION = 0.05
# Micro-batches laid out to measure the layout's padding: enough for a stable share, cheap for any data.
PADDING_SAMPLE_BATCHES = 64


@dataclass(frozen=True)
class DataSummary:
    """What loading and tokenization made of a dataset (see `summarize_data`)."""

    source: str | None
    source_format: str | None
    rows_read: int
    pairs: int
    skipped: dict[str, int]
    duplicates: int
    prompts_truncated: int
    completions_truncated: int
    pairs_truncated: int
    longest_prompt_cut: int
    longest_completion_cut: int
    max_length: int
    tokens_mean: float
    tokens_p95: int
    tokens_max: int
    layout: str | None = None
    padding_fraction: float | None = None
    padding_batches: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def truncated_fraction(self) -> float:
        return self.pairs_truncated / self.pairs if self.pairs else 0.0

    def format_lines(self) -> list[str]:
        what = self.source or "training data"
        lines = [f"data: {what}" + (f" ({self.source_format} format)" if self.source_format else "")]
        rows = [("rows read", f"{self.rows_read}"), ("pairs kept", f"{self.pairs}")]
        skipped = sum(self.skipped.values())
        if skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(self.skipped).most_common())
            rows.append(("skipped", f"{skipped}: {reasons}"))
        else:
            rows.append(("skipped", "0"))
        if self.duplicates:
            rows.append(("duplicates", f"{self.duplicates} pairs identical to an earlier one"))
        if self.pairs_truncated:
            parts = []
            if self.prompts_truncated:
                parts.append(f"{self.prompts_truncated} prompts (longest {self.longest_prompt_cut} tokens)")
            if self.completions_truncated:
                parts.append(f"{self.completions_truncated} completions (longest {self.longest_completion_cut})")
            rows.append(("truncated", f"{self.pairs_truncated} pairs ({self.truncated_fraction:.1%}): "
                                      f"{', '.join(parts)}, to max_length={self.max_length}"))
        else:
            rows.append(("truncated", f"0 (max_length={self.max_length})"))
        rows.append(("tokens per pair", f"mean {self.tokens_mean:.0f}, p95 {self.tokens_p95}, max {self.tokens_max} "
                                        "(prompt + chosen + rejected)"))
        if self.layout is not None and self.padding_fraction is not None:
            rows.append(("layout", padding_line(self.layout, self.padding_fraction, self.padding_batches)))
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
        lines += [f"warning: {w}" for w in self.warnings]
        return lines

    def format(self) -> str:
        return "\n".join(self.format_lines())


def padding_line(layout: str, fraction: float, batches: int) -> str:
    """How much of a layout's batches is padding, as the summary words it."""
    return f"{layout}: {fraction:.1%} of the batch positions are padding (first {batches} micro-batches)"


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    """The nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def layout_padding(pairs: Sequence[TokenizedPair], layout: str, *, pairs_per_batch: int,
                   row_capacity: int | None = None, pad_id: int = 0, seed: int = 0,
                   max_batches: int = PADDING_SAMPLE_BATCHES) -> tuple[float, int]:
    """(share of padding positions, micro-batches measured) over the first `max_batches` micro-batches of a
    seeded shuffle of `pairs`, laid out as the trainer lays them out (`dpo_fast.data.layouts.build_batch`)."""
    import torch

    from .layouts import build_batch

    if not pairs:
        return 0.0, 0
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    order = order[:pairs_per_batch * max_batches]
    real = total = batches = 0
    for start in range(0, len(order), pairs_per_batch):
        members = [pairs[i] for i in order[start:start + pairs_per_batch]]
        batch = build_batch(members, layout, pad_id=pad_id,
                            max_tokens_per_row=None if layout == "padded" else row_capacity)
        real += batch.num_tokens
        total += batch.input_ids.numel()
        batches += 1
    return 1.0 - real / total, batches


def summarize_data(pairs: Sequence[TokenizedPair], stats: TokenizeStats, *, max_length: int,
                   load_report: Any = None, layout: str | None = None, pairs_per_batch: int = 4,
                   row_capacity: int | None = None, pad_id: int = 0, seed: int = 0) -> DataSummary:
    """The summary of `pairs`, as `tokenize_dataset` returned them with its `stats`.

    load_report: the `dpo_fast.data.LoadReport` of the rows (rows read, rows skipped and why), when known.
    layout (with pairs_per_batch, row_capacity, pad_id, seed): measure that layout's padding share.
    """
    skipped: Counter = Counter()
    if load_report is not None:
        skipped.update(load_report.skipped)
    skipped.update(stats.dropped)
    seen: set[tuple] = set()
    duplicates = 0
    for p in pairs:
        key = (p.prompt_ids, p.chosen_ids, p.rejected_ids)
        duplicates += key in seen
        seen.add(key)
    tokens = sorted(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    padding, batches = (None, 0)
    if layout is not None and pairs:
        padding, batches = layout_padding(pairs, layout, pairs_per_batch=pairs_per_batch, row_capacity=row_capacity,
                                          pad_id=pad_id, seed=seed)
    summary = DataSummary(
        source=getattr(load_report, "source", None), source_format=getattr(load_report, "format", None),
        rows_read=load_report.rows_read if load_report is not None else stats.rows, pairs=len(pairs),
        skipped=dict(skipped), duplicates=duplicates, prompts_truncated=stats.prompts_truncated,
        completions_truncated=stats.completions_truncated, pairs_truncated=stats.pairs_truncated,
        longest_prompt_cut=stats.longest_prompt_cut, longest_completion_cut=stats.longest_completion_cut,
        max_length=max_length, tokens_mean=sum(tokens) / len(tokens) if tokens else 0.0,
        tokens_p95=_percentile(tokens, 0.95) if tokens else 0, tokens_max=tokens[-1] if tokens else 0,
        layout=layout, padding_fraction=padding, padding_batches=batches)
    if summary.truncated_fraction > TRUNCATION_WARNING_FRACTION:
        summary.warnings.append(
            f"{summary.truncated_fraction:.1%} of the pairs were truncated to max_length={max_length} (over "
            f"{TRUNCATION_WARNING_FRACTION:.0%}): the model trains on cut prompts and completions; raise "
            "--max-length or filter the long rows")
    return summary
