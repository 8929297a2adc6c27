"""Normalisation layers: torch-native modules, which dispatch to fused kernels (RMSNorm's CPU
training pass is lmlab's own: `rms_norm`)."""

from __future__ import annotations

from torch import nn

from lmlab.models.layers.rms_norm import RMSNorm

NORM_KINDS = ("layernorm", "rmsnorm")


def build_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r} (valid: {', '.join(NORM_KINDS)})")
