"""A test-only callback: the gradient of the backbone's first trainable parameter becomes NaN at
one step, through a hook on the parameter, so it works where the strategy keeps gradients out of
`p.grad` (DeepSpeed ZeRO)."""

from __future__ import annotations

import lightning as L


class PoisonGradsAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        param = next(p for p in pl_module.backbone.parameters() if p.requires_grad)
        handles = []

        def poison(grad):
            handles.pop().remove()  # once
            return grad * float("nan")

        handles.append(param.register_hook(poison))
