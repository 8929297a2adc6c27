"""Key/value cache for incremental decoding.

Preallocated once per generation ([B, n_kv_heads, max_len, head_dim] per layer, GQA-sized so
it is n_heads/n_kv_heads times smaller than an MHA cache) and filled in place: no per-step
concatenation, no reallocation.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKVCache:
    """One layer's view of a `KVCache`; attention layers only ever see this."""

    def __init__(self, parent: KVCache, index: int):
        self.parent = parent
        self.index = index

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values [B, Hkv, T, D] after the filled part; return all of them.

        The write offset is the parent's length, which only advances once every layer has
        written (`KVCache.advance`), so all layers of one forward write at the same offset.
        """
        start = self.parent.length
        end = start + k.shape[-2]
        keys, values = self.parent.keys[self.index], self.parent.values[self.index]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class KVCache:
    """Per-layer preallocated K/V tensors plus the number of filled positions."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0
        self.layers = [LayerKVCache(self, i) for i in range(n_layers)]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Reuse the buffers for a new batch of prompts; old contents are simply overwritten."""
        self.length = 0

    def check_room(self, batch_size: int, n_new: int) -> None:
        """Fail with a readable message instead of a shape error deep inside attention."""
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, "
                             f"got a batch of {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} are filled "
                             f"and {n_new} more do not fit (make it with a larger max_len)")
