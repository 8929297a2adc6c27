"""StochasTok (Sims et al., 2025): split random tokens into two known tokens, for training only.

A token t can be split as (a, b) when a and b are both ordinary tokens of the vocabulary and
decoding [a, b] gives the same text as decoding [t]. Which strings concatenate that way depends on
the kind: plain concatenation for BPE / Unigram / SentencePiece pieces (their space marks "▁"/"Ġ"
are ordinary characters of the piece), and WordPiece's continuation prefix ("hello" = "he" +
"##llo", "##llo" = "##l" + "##lo").

The table of splits is built once from the vocabulary; applying it to a sequence is a handful of
numpy operations, so ids that are already tokenized (a memory-mapped training window) can be
perturbed per batch without touching text.

Unlike the paper's loop, which picks random positions one at a time and may split a piece again,
each token here is split at most once, with probability `rate` (expected number of splits is the
same, `rate` x length); apply it twice for finer pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitTable:
    """Compressed rows: token i's splits are (left[j], right[j]) for j in start[i]:start[i]+count[i]."""

    start: np.ndarray
    count: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @property
    def splittable(self) -> int:
        return int(np.count_nonzero(self.count))


def build_split_table(
    vocab: Sequence[str], usable: np.ndarray, continuation_prefix: str | None = None
) -> SplitTable:
    """All two-piece splits of every usable token into usable tokens.

    `usable[i]` is False for specials, unknown/byte/control pieces: they are never split nor used
    as a part. `continuation_prefix` is WordPiece's "##" (None for concatenating vocabularies).
    """
    index = {tok: i for i, tok in enumerate(vocab) if usable[i]}
    starts = np.zeros(len(vocab), dtype=np.int64)
    counts = np.zeros(len(vocab), dtype=np.int64)
    left: list[int] = []
    right: list[int] = []
    # One pass over the vocabulary at build time; the per-sequence work is vectorised below.
    for i, token in enumerate(vocab):
        if not usable[i]:
            continue
        starts[i] = len(left)
        for a, b in _candidate_splits(token, continuation_prefix):
            ia, ib = index.get(a), index.get(b)
            if ia is not None and ib is not None:
                left.append(ia)
                right.append(ib)
        counts[i] = len(left) - starts[i]
    return SplitTable(
        starts, counts, np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    )


def _candidate_splits(token: str, prefix: str | None) -> list[tuple[str, str]]:
    if prefix is None:
        return [(token[:k], token[k:]) for k in range(1, len(token))]
    head = prefix if token.startswith(prefix) else ""
    core = token[len(head) :]
    return [(head + core[:k], prefix + core[k:]) for k in range(1, len(core))]


def apply_splits(
    ids: np.ndarray, table: SplitTable, rate: float, rng: np.random.Generator
) -> np.ndarray:
    """Split each splittable token with probability `rate` into one of its splits, uniformly."""
    ids = np.asarray(ids, dtype=np.int64)
    if rate <= 0 or ids.size == 0:
        return ids
    inside = (ids >= 0) & (ids < len(table.count))
    counts = np.where(inside, table.count[np.where(inside, ids, 0)], 0)
    chosen = (rng.random(ids.size) < rate) & (counts > 0)
    if not chosen.any():
        return ids
    picks = table.start[ids[chosen]] + (rng.random(int(chosen.sum())) * counts[chosen]).astype(
        np.int64
    )
    widths = np.where(chosen, 2, 1)
    out = np.repeat(ids, widths)
    first = np.cumsum(widths) - widths  # where each input token starts in the output
    out[first[chosen]] = table.left[picks]
    out[first[chosen] + 1] = table.right[picks]
    return out
