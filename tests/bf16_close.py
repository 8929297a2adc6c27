"""How close two bf16 results of the same computation must be when their fp32 sums ran in
another order: within one bf16 rounding step either way."""

from __future__ import annotations

import torch

# One bf16 rounding step (8 significant bits): the two results may differ by it where the fp32
# sums, accumulated in another order, straddle a rounding boundary.
BF16_ULP = 2.0 ** -7


def assert_bf16_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, and within two bf16 steps of `b`'s largest magnitude."""
    assert a.dtype == b.dtype
    scale = b.float().abs().max().clamp_min(1e-6)
    assert ((a.float() - b.float()).abs().max() / scale).item() <= 2 * BF16_ULP
