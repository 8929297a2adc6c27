"""What a run's training state weighs: parameters, gradients and optimizer state, in bytes.

`MemoryMonitor` measures each number once, from tensor sizes and dtypes (metadata only: no
device sync, nothing per step after the first optimizer step) and `run` puts them in the record
under `memory`, so PEFT methods and optimizers can be compared by what they cost:

- `param_bytes`, `trainable_param_bytes`: every parameter (tied weights once) / those that train.
- `grad_bytes`: the gradients present at the first optimizer step (frozen parameters have none).
- `optimizer_state_bytes`: every tensor in the optimizers' state after the first step (Adam's two
  moments and step counters; the 8-bit moments, quantisation maps and block maxima of adamw8bit;
  Adafactor's row/column factors).
- `cuda_peak_allocated_bytes` (GPU runs): the allocator's peak over fit, activations included.

Under FSDP2 and DeepSpeed the numbers are this rank's: FSDP2's shards, DeepSpeed's optimizer-state
partition. DeepSpeed keeps gradients in buffers of its own (`grad_bytes` reads 0) and ZeRO-3
moves the parameters out of the module (`param_bytes` reads 0).
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from torch import Tensor


def tensor_bytes(tensor: Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this rank's shard
    return local.numel() * local.element_size()


def parameter_bytes(params: Iterable[Tensor]) -> int:
    return sum(tensor_bytes(p) for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        tensor_bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


class MemoryMonitor(L.Callback):
    """Fills `self.memory` (see the module docstring) during the first optimizer step."""

    def __init__(self):
        self.memory: dict[str, int] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.parameters())  # tied weights are yielded once
        self.memory["param_bytes"] = parameter_bytes(params)
        self.memory["trainable_param_bytes"] = parameter_bytes(p for p in params if p.requires_grad)
        if pl_module.device.type == "cuda":
            # The peak is the process's: the runs of a sweep share one process (Hydra's basic
            # launcher), and each must report its own.
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if "grad_bytes" not in self.memory:
            self.memory["grad_bytes"] = parameter_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "optimizer_state_bytes" in self.memory or trainer.global_step == 0:
            return  # no optimizer step yet (gradient accumulation) or measured already
        state = sum(optimizer_state_bytes(opt) for opt in trainer.optimizers)
        # A skipped first step (NonFiniteGuard policy=skip) leaves the state empty: try the next.
        if state or trainer.global_step > 1:
            self.memory["optimizer_state_bytes"] = state

    def on_train_end(self, trainer, pl_module) -> None:
        device = pl_module.device
        if device.type == "cuda":
            self.memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)


def memory_of(trainer: L.Trainer) -> dict[str, int] | None:
    """The run's memory numbers, or None when no MemoryMonitor ran (`callbacks=none`)."""
    for callback in trainer.callbacks:
        if isinstance(callback, MemoryMonitor):
            return dict(callback.memory) or None
    return None

