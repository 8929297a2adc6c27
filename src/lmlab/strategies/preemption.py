"""Every rank of a multi-process run stopping at the same step when any of them gets SIGTERM.

A preemption (SLURM's SIGTERM, or the requeue bridge's) reaches the ranks of a job at different
moments, or one rank only. Lightning 2.6 handles it with collectives on the default process
group: on whichever rank gets the signal, the handler itself calls a broadcast from rank zero,
and every training batch broadcasts rank zero's flag and reads it back with `.item()`. Both go
wrong:

- a broadcast from inside a handler runs wherever the signal lands; between a rank's forward
  and backward it meets the other ranks' gradient all-reduce, and the job hangs (no checkpoint,
  until SLURM kills it; `tests/strategies/test_preemption.py` hung so on either rank);
- the per-batch `.item()` of a device tensor waits for the GPU to finish the step: a host-device
  synchronisation in every step of every multi-GPU run, which stops the host from queueing the
  next step while the GPU works;
- only rank zero's signal counted; a signal on another rank stopped that rank alone.

`SigtermConsensus` replaces both. The handler only notes the signal (and forwards it to the
ranks this process started, as Lightning's does). At each optimizer-step boundary every rank
puts its note into an all-reduce (max) over a gloo group of CPU tensors, started without
waiting and read at the next boundary: nothing waits for the device, and the host waits on the
network only if the previous exchange has not arrived after a whole step. When the exchange says
some rank was signalled, every rank sets Lightning's `received_sigterm` at that same batch:
`ResumeCheckpoint` saves `last.ckpt` there (one collective save, all ranks in it) and Lightning
stops the loop with `SIGTERMException`, which the record turns into `preempted`. The cost is
stopping one or two optimizer steps after the signal (two when it lands after the step's
exchange has started, e.g. during a validation).

Outside `fit` (the evaluation after it) the note stops nothing: ranks leaving an evaluation at
different batches would hang in its metric reductions. The job ends at the kill that follows
(a submitit job is not requeued then; Lightning's handler hung there); rerunning the command
resumes from the `last.ckpt` saved when training ended.

Single-process runs keep Lightning's handling: without other ranks it has no collective.

The same exchange carries rank zero's vote for a time-based save (`ResumeCheckpoint`'s
`every_n_seconds`): the ranks' clocks differ and a save is collective, so one clock must decide
for all; a broadcast of it at every step would be a device round trip on NCCL. The vote arrives
a step later, at the same batch on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import FrameType

import lightning as L
import torch
import torch.distributed as dist

log = logging.getLogger("lmlab")


class SigtermConsensus(L.Callback):
    """Put first in the Trainer's callbacks (`use_sigterm_consensus`): the agreement must be in
    place before `ResumeCheckpoint` decides at the same batch end whether to save."""

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._trainer: L.Trainer | None = None
        self._signalled = False
        self._flag: torch.Tensor | None = None
        self._exchange: dist.Work | None = None
        # Rank zero's vote for a time-based save, as agreed at this boundary, and the step at
        # whose boundary it was cast (the last one).
        self.time_due = False
        self.time_vote_step = -1
        self.time_voter: Callable[[], bool] | None = None
        self._vote_step = -1

    @property
    def active(self) -> bool:
        """Whether this run's ranks exchange notes (several processes, inside `fit`)."""
        return self._group is not None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        self._signalled = False
        # Every rank reaches on_fit_start, so every rank creates the group (a collective call).
        # A gloo group of its own: CPU tensors whatever the default backend, and no ordering
        # against the default group's gradient collectives.
        self._group = dist.new_group(backend="gloo")
        self._trainer = trainer
        # Lightning registers its SIGTERM handlers after on_fit_start, reading this attribute.
        trainer._signal_connector._sigterm_notifier_fn = self._note_signal
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_broadcast

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler: no collective, no lock, no I/O beyond a log line.
        if not self._signalled and self._trainer is not None:
            launcher = self._trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # the ranks this process started, as Lightning does
        log.info("rank %s: SIGTERM; every rank stops within two optimizer steps",
                 self._trainer.global_rank if self._trainer is not None else "?")
        self._signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The boundaries ResumeCheckpoint saves at: mid-accumulation state cannot be resumed.
        if self._group is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        signalled, self.time_due = self._collect()
        self.time_vote_step = self._vote_step
        if signalled:
            trainer._signal_connector.received_sigterm = True
        vote = trainer.is_global_zero and self.time_voter is not None and self.time_voter()
        self._vote_step = trainer.global_step
        self._flag = torch.tensor([int(self._signalled), int(vote)], dtype=torch.int32)
        self._exchange = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group,
                                         async_op=True)

    def _collect(self) -> tuple[bool, bool]:
        """The previous exchange's result: whether any rank had been signalled by then, and
        whether rank zero voted for a time-based save."""
        if self._exchange is None or self._flag is None:
            return False, False
        self._exchange.wait()
        self._exchange = None
        signalled, vote = self._flag.tolist()  # CPU tensors: no device synchronisation
        return bool(signalled), bool(vote)

    def on_train_end(self, trainer, pl_module) -> None:
        self._collect()  # every rank started the same exchanges: none is left in flight

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A rank that failed may not have started the exchange the others wait on: leave the
        # group to the process's exit rather than wait for it.
        self._group = self._exchange = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._group is not None and stage == "fit":
            self._collect()
            dist.destroy_process_group(self._group)
            self._group = None


def _no_broadcast() -> None:
    """Lightning's per-batch broadcast of rank zero's SIGTERM flag, replaced by the exchange."""


def consensus_of(trainer: L.Trainer) -> SigtermConsensus | None:
    """The trainer's `SigtermConsensus`, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, SigtermConsensus)), None)


def use_sigterm_consensus(trainer: L.Trainer) -> None:
    """Put a `SigtermConsensus` first among the trainer's callbacks (it acts only when the run
    has more than one process)."""
    trainer.callbacks.insert(0, SigtermConsensus())
