"""Unstructured magnitude pruning with `torch.nn.utils.prune`.

`prune_to(layers, sparsity, scope)` zeroes the smallest-magnitude weights until exactly
round(sparsity · n) weights are pruned — over all layers together (`global`: one threshold,
layers that matter less lose more) or in every layer separately (`layer`). Pruning again to a
higher sparsity (the gradual schedule) only adds to the existing masks: torch's
`PruningContainer` ranks the weights that are still alive, so a pruned weight never returns.
While masks are attached, `weight = weight_orig * weight_mask` is recomputed on every forward,
so fine-tuning cannot revive a pruned weight; `make_permanent` folds the masks into plain
weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

SCOPES = ("global", "layer")


def is_masked(module: nn.Module) -> bool:
    return prune.is_pruned(module) and hasattr(module, "weight_mask")


def pruned_count(module: nn.Module) -> int:
    if is_masked(module):
        return int((module.weight_mask == 0).sum())
    return 0


def prune_to(layers: dict[str, nn.Linear], sparsity: float, scope: str) -> None:
    """Mask weights of `layers` by magnitude so that exactly round(sparsity · n) are pruned
    (`global`), or round(sparsity · n_layer) in each layer (`layer`)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (valid: {', '.join(SCOPES)})")
    modules = list(layers.values())
    if scope == "global":
        total = sum(m.weight.numel() for m in modules)
        extra = round(sparsity * total) - sum(pruned_count(m) for m in modules)
        if extra > 0:
            prune.global_unstructured([(m, "weight") for m in modules], pruning_method=prune.L1Unstructured,
                                      amount=extra)
        return
    for module in modules:
        extra = round(sparsity * module.weight.numel()) - pruned_count(module)
        if extra > 0:
            prune.l1_unstructured(module, "weight", amount=extra)


def attach_masks(layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    """Re-attach saved masks (a resumed gradual-pruning run)."""
    for name, mask in masks.items():
        module = layers[name]
        if not is_masked(module):
            prune.custom_from_mask(module, "weight", mask.to(module.weight.device))


def current_masks(layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    return {name: m.weight_mask.detach().bool().cpu() for name, m in layers.items() if is_masked(m)}


def make_permanent(backbone: nn.Module) -> nn.Module:
    """Fold every attached mask into its weight (`weight_orig * mask` becomes `weight`)."""
    for module in backbone.modules():
        if is_masked(module):
            prune.remove(module, "weight")
    return backbone


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with `x.weight_orig` / `x.weight_mask` pairs folded into `x.weight`, so
    checkpoints taken while masks are attached load into a plain backbone (resume, init_from)."""
    out = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            out[base] = value * state[base + "_mask"].to(value.dtype)
        else:
            out[key] = value
    return out


def sparsity_of(layers: dict[str, nn.Linear]) -> float:
    """Share of exactly-zero weights over `layers` (what a sparse format could drop)."""
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / total if total else 0.0
