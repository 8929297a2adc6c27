"""Crash-safe checkpoints.

Every checkpoint is written to a temporary file and renamed into place, so a kill during a
write never leaves a truncated file under the real name. `last.ckpt` (what resume uses) is kept
current by `ResumeCheckpoint` every N steps and/or T seconds, at the end of training and when
SIGTERM arrives (the SLURM preemption path); the previous one is kept as `last.prev.ckpt` until
the new one is complete, and a state with non-finite weights is never written over it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmlab.strategies.preemption import consensus_of

log = logging.getLogger("lmlab")

LAST_NAME = "last.ckpt"
PREVIOUS_NAME = "last.prev.ckpt"


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf; the message names the step and the last good checkpoint."""


def atomic_save_checkpoint(
    trainer: L.Trainer, filepath: str | Path, weights_only: bool = False, keep_previous: str | Path | None = None
) -> None:
    filepath = Path(filepath)
    tmp = filepath.with_name(f".{filepath.name}.tmp")
    if trainer.is_global_zero and tmp.is_dir():
        shutil.rmtree(tmp)  # a sharded save cut short; the strategies broadcast the path first
    trainer.save_checkpoint(tmp, weights_only)
    if trainer.is_global_zero:
        if tmp.is_dir():  # FSDP2 / DeepSpeed write a folder: rename folders, old ones removed
            if keep_previous is not None and filepath.exists():
                _remove(keep_previous)
                os.replace(filepath, keep_previous)
            _remove(filepath)
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if keep_previous is not None and filepath.exists():
                os.replace(filepath, keep_previous)
        os.replace(tmp, filepath)
    trainer.strategy.barrier("atomic_save_checkpoint")


def _remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def last_good_checkpoint(dirpath: str | Path) -> Path | None:
    for name in (LAST_NAME, PREVIOUS_NAME):
        path = Path(dirpath) / name
        if path.is_file():
            return path
    return None


def _local_part(p: torch.Tensor) -> torch.Tensor:
    """The elements of `p` this rank holds: a ZeRO-3 partition (`p` itself is then an empty
    placeholder), an FSDP2 DTensor's shard, or `p`."""
    part = getattr(p, "ds_tensor", None)
    if part is not None:
        return part
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


def weights_are_finite(module: torch.nn.Module, trainer: L.Trainer | None = None) -> bool:
    """Whether every weight is finite. Each rank checks what it holds, and with several ranks
    (sharded weights: each holds a part) the verdict is every rank's: one collective, which
    every rank reaches because saves are collective too. (A DTensor's own `isfinite().all()`
    is a pending product that `bool()` reads locally: each rank judged its own shard, and a rank
    that refused to save left the others waiting in the save.)"""
    flags = [torch.isfinite(_local_part(p)).all() for p in module.parameters()]
    finite = bool(torch.stack(flags).all()) if flags else True
    if trainer is not None and trainer.world_size > 1:
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
    return finite


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best-k by a metric), writing each file atomically."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        atomic_save_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class ResumeCheckpoint(L.Callback):
    """Keeps `<dirpath>/last.ckpt` current for resuming a killed or preempted run."""

    def __init__(self, dirpath: str, every_n_steps: int | None = 100, every_n_seconds: float | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1 or None")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self._last_time = time.monotonic()
        self._saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST_NAME

    def state_dict(self) -> dict:
        return {"saved_step": self._saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_step = state_dict.get("saved_step", -1)

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == self._saved_step or step == 0:
            return False
        by_time = self._time_due(trainer)  # first: without the consensus, a collective every rank must reach
        if getattr(trainer, "received_sigterm", False):
            return True
        return bool(self.every_n_steps and step % self.every_n_steps == 0) or by_time

    def _clock_due(self) -> bool:
        return self.every_n_seconds is not None and time.monotonic() - self._last_time >= self.every_n_seconds

    def _time_due(self, trainer: L.Trainer) -> bool:
        if self.every_n_seconds is None:
            return False
        if trainer.world_size == 1:
            return self._clock_due()
        # The ranks' clocks differ, and a save is collective: ranks that disagreed would wait
        # for each other forever (rank zero in the save, the others in the next step's
        # all-reduce). Rank zero's clock decides. Its vote rides on the ranks' SIGTERM exchange
        # (lmlab.strategies.preemption), a CPU all-reduce a step late; a vote cast at the
        # boundary of the last save, before it, is stale.
        consensus = consensus_of(trainer)
        if consensus is not None and consensus.active:
            consensus.time_voter = self._clock_due
            return consensus.time_due and consensus.time_vote_step > self._saved_step
        # Without it (a Trainer not built by lmlab.train): a broadcast every step, which on
        # NCCL is a device round trip, as in Lightning's ModelCheckpoint(train_time_interval).
        return trainer.strategy.broadcast(self._clock_due(), src=0)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not weights_are_finite(pl_module, trainer):
            good = last_good_checkpoint(self.dirpath)
            raise NonFiniteError(
                f"non-finite weights at step {trainer.global_step}; not overwriting the last good "
                f"checkpoint ({good or 'none saved yet'})"
            )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self._saved_step = trainer.global_step  # set before saving: it is part of the saved state
        atomic_save_checkpoint(trainer, self.last_path, keep_previous=self.dirpath / PREVIOUS_NAME)
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Only at optimizer-step boundaries: mid-accumulation state cannot be resumed exactly.
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and self._due(trainer):
            self.save(trainer, pl_module)
            if getattr(trainer, "received_sigterm", False):
                log.warning("SIGTERM: saved %s at step %d; rerun the same command to resume",
                            self.last_path, trainer.global_step)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A SIGTERM that lands outside a training batch (during validation, say) stops the loop
        # before on_train_batch_end could save: save the finished steps now. One process only:
        # sharded saves are collective, and other ranks may not be here.
        if (isinstance(exception, SIGTERMException) and trainer.state.fn == "fit"
                and trainer.world_size == 1 and trainer.global_step not in (0, self._saved_step)):
            self.save(trainer, pl_module)
            log.warning("SIGTERM: saved %s at step %d; rerun the same command to resume",
                        self.last_path, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer, pl_module)
