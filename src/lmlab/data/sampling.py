"""Batch sampling that is a pure function of (seed, step, rank).

A resumed run rebuilds its sampler at the step it stopped at and sees exactly the batches an
uninterrupted run would have seen; no sampler state needs to be checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """An endless stream of index batches; batch number `s` depends only on (seed, s, rank).

    mode="permutation" walks through seeded per-epoch permutations of the items (every item seen
    once per epoch); mode="random" draws items uniformly (for random windows over a corpus).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "permutation",
        with_step: bool = False,
    ):
        if num_items <= 0:
            raise ValueError("StepBatchSampler needs at least one item")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        # Stochastic tokenization draws its randomness from (seed, step, item): items then
        # carry their step, so a resumed run re-draws exactly what the uninterrupted one did.
        self.with_step = with_step
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(self.num_items))
        return self._perm_cache[1]

    def batch_at(self, step: int) -> list[int]:
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step, self.rank])
            return rng.integers(0, self.num_items, self.batch_size).tolist()
        # Ranks take interleaved slices of one global batch, so DDP sees each item once per epoch.
        global_bs = self.batch_size * self.world_size
        start = step * global_bs + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.num_items):
            sel = positions // self.num_items == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % self.num_items]
        return out.tolist()

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while True:
            batch = self.batch_at(step)
            yield [(step, i) for i in batch] if self.with_step else batch
            step += 1
