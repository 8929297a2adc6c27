"""A test-only callback: every rank fails at the end of training step `step`, rank zero only
after `rank_zero_delay_s` (as when it is slower to get there, or still writing its record)."""

from __future__ import annotations

import time

import lightning as L


class FailOnEveryRank(L.Callback):
    def __init__(self, step: int, rank_zero_delay_s: float):
        self.step, self.rank_zero_delay_s = step, rank_zero_delay_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if trainer.global_rank == 0:
                time.sleep(self.rank_zero_delay_s)
            raise RuntimeError(f"planned failure on rank {trainer.global_rank}")
