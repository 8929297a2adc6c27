"""Several `nn.Linear` layers that read the same input, computed as one matmul.

Attention's q/k/v projections (and cross-attention's k/v) all multiply the same activations.
One matmul over their concatenated weights is one larger GEMM forward and, in backward, one
d(input) matmul instead of one per projection plus the adds that sum them. The layers stay
separate modules with their own parameters (names, state dict, weight export, PEFT and the
optimizer are unchanged): the weights are concatenated at each call, a copy of the weights
only, small against a matmul over every token, and autograd splits the gradient back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` computing exactly x W^T + b: not a subclass (LoRA, quantised,
    parametrized), no replaced forward or hooks (pruning masks, DeepSpeed ZeRO-3's parameter
    gathering), its weight and bias plain tensors (not FSDP2's DTensor shards)."""
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks
            and all(type(t.detach()) is torch.Tensor
                    for t in (module.weight, module.bias) if t is not None))


def fusable(parts: tuple[nn.Module, ...]) -> bool:
    """Whether `concatenated_linear(parts, x)` computes the same as the parts one by one."""
    return (all(plain_linear(p) for p in parts)
            and len({p.bias is None for p in parts}) == 1  # type: ignore[union-attr]
            and len({(p.weight.dtype, p.weight.device) for p in parts}) == 1)  # type: ignore[union-attr]


def concatenated_linear(parts: tuple[nn.Linear, ...], x: Tensor) -> Tensor:
    """cat([part(x) for part in parts], -1) as one matmul (`fusable(parts)` must hold)."""
    weight = torch.cat([p.weight for p in parts])
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    return F.linear(x, weight, bias)
