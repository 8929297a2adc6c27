"""Momentum buffers created before the first step, for torch's fused SGD.

torch's fused SGD creates a missing momentum buffer with `empty_like` and fills it inside the
kernel of the first update. When that update is skipped on the device (a GradScaler overflow
under `16-mixed`, or `NonFiniteGuard`'s skip flag) the kernel returns early and the
uninitialised buffer stays in the optimizer's state: the next step adds momentum × garbage to
the weights (torch 2.13). With dampening 0 (torch's default; nesterov requires it) a zero buffer
gives bitwise the first update torch would make (momentum · 0 + g = g), so the buffers are
created as zeros up front. Other dampening keeps torch's first step (the guard decides that
step on the host).
"""

from __future__ import annotations

import torch


def zero_fused_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of `optimizer`'s fused momentum-SGD groups (dampening 0) a zero
    momentum buffer where it has none yet; anything else is left as it is."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("fused") or not group.get("momentum") or group.get("dampening", 0) != 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
