"""The two data contracts between tokenization, layouts and the trainer.

`TokenizedPair` is what tokenization produces for one preference row; `Batch` is what a layout
builds from a list of them and what the model and `linear_dpo_loss` consume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

IGNORE_INDEX = -100

# Token roles in a batch (the attention mask and the analyses read them).
ROLE_PAD = -1
ROLE_PROMPT = 0
ROLE_CHOSEN = 1
ROLE_REJECTED = 2

LAYOUTS = ("padded", "packed", "prefix_shared")


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids.

    prompt_ids: the context (all earlier turns, chat template applied), identical for both responses.
    chosen_ids / rejected_ids: the completion tokens only, each ending with EOS unless it was truncated
        to fit max_length (a cut completion must not teach the model to stop there).
    index: the row of the source dataset this pair came from (for error messages and reordering).
    """

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int = -1

    @property
    def num_tokens_padded(self) -> int:
        """Tokens this pair occupies as two separate sequences (prompt counted twice)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class Batch:
    """Model inputs for B pairs in one of the layouts of `LAYOUTS`. All tensors are [R, L].

    labels are aligned with the model's outputs (labels[r, t] is the token that position t predicts;
    IGNORE_INDEX where nothing is scored), and segment_ids follow `fused_dpo_loss`'s packed convention:
    sequences 0..B-1 are the chosen responses and B..2B-1 the rejected ones (pair i = (i, B+i)), -1 for
    unscored positions. So `linear_dpo_loss(hidden.view(-1, H), lm_head.weight, labels.view(-1),
    segment_ids=segment_ids.view(-1))` scores every layout the same way.
    document_ids: which pair a token belongs to (-1 for padding); roles: ROLE_* per token.
    pair_indices: for each of the B pairs, its `TokenizedPair.index`.
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    document_ids: Tensor
    roles: Tensor
    num_pairs: int
    layout: str
    pair_indices: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return int((self.roles != ROLE_PAD).sum())

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory, so that copies to a GPU need not block the host."""
        tensors = ("input_ids", "labels", "position_ids", "segment_ids", "document_ids", "roles")
        return dataclasses.replace(self, **{name: getattr(self, name).pin_memory() for name in tensors})


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """A content hash of tokenized pairs (the data a checkpoint or a reference cache was made from)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()
