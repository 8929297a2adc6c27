"""Evaluation batches shared out across data-parallel ranks.

Each rank runs a disjoint share of a validation/test split; the meters' sums (torchmetrics,
synchronised at `compute`) and the decoded strings (gathered at epoch end) then cover the whole
split once. Until 2026-11-24 every rank ran every batch: the numbers were right (each item
counted `world` times in numerator and denominator alike) but the work was `world` times.

Every rank gets the same number of batches, none empty: under FSDP2 and ZeRO-3 each forward
is a collective (a rank with an extra batch would wait forever), and under DDP the first
forward after training broadcasts the module buffers. So the split's items are cut into a
multiple of `world` contiguous batches of nearly equal size, dealt out in turn: rank r runs
batches r, r + world, ... Batches hold at most `batch_size` items, except that with
`batch_size` 1 and a split that does not divide by `world` (or a split of under 2·(world + 1)
items) some hold 2: the alternative, every rank running the whole split, is `world` times the
work. A split with fewer items than ranks is run whole on every rank, as before.
"""

from __future__ import annotations

import math


def eval_batches(n_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The item indices of each evaluation batch `rank` runs, in order."""
    if 1 < world_size <= n_items:
        n_batches = world_size * math.ceil(math.ceil(n_items / batch_size) / world_size)
        # No empty batch: with batch_size 1 (or a handful of items) that can take batches of 2.
        n_batches = min(n_batches, world_size * (n_items // world_size))
        bounds = [i * n_items // n_batches for i in range(n_batches + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(rank, n_batches, world_size)]
    # One process, or fewer items than ranks: consecutive batches of `batch_size`, the last
    # one shorter (a DataLoader's own batching).
    return [list(range(start, min(start + batch_size, n_items))) for start in range(0, n_items, batch_size)]


def share_of_decoding(n_batches: int | None, world_size: int) -> int | None:
    """How many of its evaluation batches each rank decodes so that the job decodes at least
    the first `n_batches` batches (the ranks must agree: decoding is collective when the
    weights are sharded)."""
    return None if n_batches is None else math.ceil(n_batches / max(1, world_size))
