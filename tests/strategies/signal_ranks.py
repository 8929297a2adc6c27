"""A test-only callback: SIGTERM to one rank's own process at one point of one training step,
as a preemption notice reaches the ranks of a job at different moments."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """`hook` is where in the step the signal lands: `on_before_backward` (between the forward
    and DDP's gradient all-reduce) or `on_train_batch_end`."""

    def __init__(self, step: int, rank: int, hook: str = "on_before_backward"):
        self.step, self.rank = step, rank
        setattr(self, hook, self._signal)

    def _signal(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)
