"""Key/value cache for incremental decoding.

Preallocated once per generation ([B, n_kv_heads, max_len, head_dim] per layer, GQA-sized so
it is n_heads/n_kv_heads times smaller than an MHA cache) and filled in place: no per-step
concatenation, no reallocation. Mamba layers of a hybrid model hold a constant-size recurrent
state instead (`LayerSSMCache`), so one cache object serves any mix of layers.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class LayerSSMCache:
    """One Mamba layer's recurrent state: O(1) in the sequence length.

    conv_state [B, d_inner, d_conv - 1]: the last inputs of the causal convolution.
    ssm_state [B, d_inner, d_state]: the SSM state, kept in float32 because it accumulates
    over the whole sequence (the scan computes in float32 too).
    """

    def __init__(
        self,
        batch_size: int,
        d_inner: int,
        d_conv: int,
        d_state: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.conv_state = torch.zeros(batch_size, d_inner, d_conv - 1, device=device, dtype=dtype)
        self.ssm_state = torch.zeros(batch_size, d_inner, d_state, device=device,
                                     dtype=torch.float32)

    def reset(self) -> None:
        # Unlike K/V slots, a recurrent state is read before it is written: it must be zeroed.
        self.conv_state.zero_()
        self.ssm_state.zero_()


class KVCache:
    """Per-layer preallocated K/V tensors plus the number of filled positions.

    ssm_layers: indices of Mamba layers; they get a `LayerSSMCache` of `ssm_dims` = (d_inner,
    d_conv, d_state) instead of K/V tensors (their `keys[i]` / `values[i]` are None).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        ssm_layers: Sequence[int] = (),
        ssm_dims: tuple[int, int, int] | None = None,
    ):
        ssm = set(ssm_layers)
        if ssm and ssm_dims is None:
            raise ValueError("a cache with Mamba layers needs ssm_dims=(d_inner, d_conv, d_state)")
        shape = (batch_size, n_kv_heads, max_len, head_dim)

        def kv() -> list[Tensor | None]:
            return [None if i in ssm else torch.zeros(shape, device=device, dtype=dtype)
                    for i in range(n_layers)]

        self.keys, self.values = kv(), kv()
        self.length = 0
        self._batch_size = batch_size
        self._max_len = max_len
        self.layers: list[LayerKVCache | LayerSSMCache] = [
            LayerSSMCache(batch_size, *ssm_dims, device=device, dtype=dtype) if i in ssm
            else LayerKVCache(self, i)
            for i in range(n_layers)
        ]

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_len(self) -> int:
        return self._max_len

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Reuse the buffers for a new batch of prompts; old K/V contents are simply overwritten."""
        self.length = 0
        for layer in self.layers:
            if isinstance(layer, LayerSSMCache):
                layer.reset()

    def check_room(self, batch_size: int, n_new: int) -> None:
        """Fail with a readable message instead of a shape error deep inside attention."""
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, "
                             f"got a batch of {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} are filled "
                             f"and {n_new} more do not fit (make it with a larger max_len)")
