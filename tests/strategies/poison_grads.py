"""Test-only callbacks that make one element of the backbone's first gradient NaN at one step, as
a real overflow starts: through a hook on the parameter where the strategy keeps gradients out of
`p.grad` (DeepSpeed ZeRO), or in one rank's shard of an FSDP2 gradient."""

from __future__ import annotations

import lightning as L


class PoisonGradsAt(L.Callback):
    """Through a hook on the parameter: before any reduction, on every rank."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        param = next(p for p in pl_module.backbone.parameters() if p.requires_grad)
        handles = []

        def poison(grad):
            handles.pop().remove()  # once
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        handles.append(param.register_hook(poison))


class PoisonShardAt(L.Callback):
    """After backward at `step`, one element of rank 0's shard of the first gradient becomes NaN:
    what a sharded gradient looks like when the overflow falls in one rank's part (FSDP2 assigns
    the reduced shards to `p.grad` itself, so a hook on the parameter never sees them)."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        grad = next(p.grad for p in pl_module.backbone.parameters() if p.grad is not None)
        local = getattr(grad, "_local_tensor", grad)  # this rank's shard of a DTensor, in place
        local.view(-1)[0] = float("nan")


class PoisonWeightShardAtEnd(L.Callback):
    """After the last training step, one element of rank 1's shard of the first weight becomes
    inf (an FSDP2 DTensor's local shard, a ZeRO-3 partition), with every gradient finite: only
    the final save's weight check can see it, and it must stop every rank, not rank 1 alone."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or trainer.global_rank != 1:
            return
        param = next(iter(pl_module.backbone.parameters()))
        shard = getattr(param, "ds_tensor", None)
        if shard is None:
            shard = getattr(param.data, "_local_tensor", param.data)
        shard.view(-1)[0] = float("inf")
