"""Gradual magnitude pruning during training: the cubic schedule of Zhu & Gupta (2017).

    s_t = s_f + (s_i − s_f) · (1 − (t − t_0) / (t_end − t_0))³    for t_0 ≤ t ≤ t_end

pruning every `every_n_steps` steps (and at t_end), fast at first while many weights are
redundant, slowly near the target. Masks stay attached (`torch.nn.utils.prune`) so the
optimizer cannot revive pruned weights, and are folded into the weights when training ends.
Checkpoints written meanwhile hold plain weights (pruned entries zero) and the masks in this
callback's state, so a resumed run continues with the same masks and `init_from` loads the
weights into a plain backbone.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lmlab.compress.targets import compressible_linears
from lmlab.compress.unstructured import (
    attach_masks,
    current_masks,
    make_permanent,
    plain_state_dict,
    prune_to,
)


def cubic_sparsity(step: int, final: float, initial: float, start: int, end: int) -> float:
    """The target sparsity after `step` optimizer steps (0 before `start`, `final` from `end`)."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruning(Callback):
    """Prunes the backbone's Linear layers (see `targets`) on the cubic schedule."""

    def __init__(self, sparsity: float, scope: str, start_step: int, end_step: int | None,
                 every_n_steps: int, initial_sparsity: float = 0.0, include_lm_head: bool = False):
        self.sparsity = sparsity
        self.scope = scope
        self.start_step = start_step
        self.end_step = end_step
        self.every_n_steps = every_n_steps
        self.initial_sparsity = initial_sparsity
        self.include_lm_head = include_lm_head
        self._saved_masks: dict[str, Any] = {}

    def _end(self, trainer: L.Trainer) -> int:
        """The step whose forward first sees the target sparsity: `end_step`, but at the latest
        the run's last step, so the final weights (and the last checkpoint) are at the target."""
        end = self.end_step if self.end_step is not None else trainer.max_steps
        if trainer.max_steps is not None and trainer.max_steps > 0:
            end = min(end, trainer.max_steps - 1)
        return max(end, self.start_step)

    def _layers(self, pl_module: L.LightningModule):
        return compressible_linears(pl_module.backbone, self.include_lm_head)

    def due(self, step: int, end: int) -> bool:
        if step < self.start_step or step > end:
            return False
        return (step - self.start_step) % self.every_n_steps == 0 or step == end

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_masks:
            attach_masks(self._layers(pl_module), self._saved_masks)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Prune before the step's forward, at optimizer-step boundaries only.
        if batch_idx % trainer.accumulate_grad_batches:
            return
        step, end = trainer.global_step, self._end(trainer)
        if self.due(step, end):
            target = cubic_sparsity(step, self.sparsity, self.initial_sparsity, self.start_step, end)
            prune_to(self._layers(pl_module), target, self.scope)
            pl_module.log("train/sparsity_target", target)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run shorter than the schedule still ends at the target sparsity.
        prune_to(self._layers(pl_module), self.sparsity, self.scope)
        make_permanent(pl_module.backbone)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = plain_state_dict(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        # Only the trainer's module is pruned, and state_dict() is called with no arguments.
        return {"masks": self._masks_now}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_masks = dict(state_dict.get("masks") or {})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._module = pl_module

    @property
    def _masks_now(self) -> dict[str, Any]:
        module = getattr(self, "_module", None)
        return current_masks(self._layers(module)) if module is not None else {}
