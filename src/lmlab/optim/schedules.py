"""Learning-rate schedules as LambdaLR factories.

Each is configured with `_partial_: true` in `conf/scheduler/` and completed by the task with
the optimizer and the run's total number of optimizer steps. The returned multiplier scales the
optimizer's `lr`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lmlab.errors import ConfigError


def _check_warmup(warmup_steps: int) -> None:
    if warmup_steps < 0:
        raise ConfigError("scheduler.warmup_steps", warmup_steps, reason="must be >= 0")


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    _check_warmup(warmup_steps)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return LambdaLR(optimizer, factor)


def linear(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup, then linear decay to `min_lr_ratio`·lr at `total_steps`."""
    _check_warmup(warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)

    return LambdaLR(optimizer, factor)


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup, then half-cosine decay to `min_lr_ratio`·lr at `total_steps`."""
    _check_warmup(warmup_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError("scheduler.min_lr_ratio", min_lr_ratio, reason="must be in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def noam(optimizer: Optimizer, total_steps: int, d_model: int, warmup_steps: int = 4000) -> LambdaLR:
    """Vaswani et al. (2017): d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), step from 1.

    The optimizer's lr multiplies this (the paper's "factor"; 1.0 reproduces the paper).
    """
    if warmup_steps < 1:
        raise ConfigError("scheduler.warmup_steps", warmup_steps, reason="noam needs warmup_steps >= 1")

    def factor(step: int) -> float:
        s = step + 1
        return d_model**-0.5 * min(s**-0.5, s * warmup_steps**-1.5)

    return LambdaLR(optimizer, factor)
