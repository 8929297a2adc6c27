"""Stop (or skip the step) when the loss or the gradients stop being finite."""

from __future__ import annotations

import logging

import lightning as L
import torch

from lmlab.callbacks.checkpointing import NonFiniteError, last_good_checkpoint

log = logging.getLogger("lmlab")
POLICIES = ("stop", "skip")


class NonFiniteGuard(L.Callback):
    """Checks the gradients before each optimizer step (one host sync per step).

    policy="stop": raise NonFiniteError naming the step and the last good checkpoint; nothing
    poisoned is saved. policy="skip": drop that step's gradients (the optimizer skips parameters
    whose grad is None) and go on; skipped steps are counted in `train/skipped_steps`.
    """

    def __init__(self, policy: str = "stop", checkpoint_dir: str | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.policy = policy
        self.checkpoint_dir = checkpoint_dir
        self.skipped = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if bool(finite):
            return
        step = trainer.global_step
        if self.policy == "skip":
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("non-finite gradients at step %d: step skipped (%d so far)", step, self.skipped)
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        good = last_good_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        raise NonFiniteError(
            f"non-finite loss or gradients at step {step}; last good checkpoint: {good or 'none saved yet'} "
            "(lower the learning rate, enable gradient clipping, or set callbacks.nonfinite.policy=skip)"
        )
