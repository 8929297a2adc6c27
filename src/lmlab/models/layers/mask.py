"""Attention masks: causality, key padding and additive biases combined into one tensor.

Built once per forward by the model assembly and shared by every layer. Queries are the last
`q_len` of the `kv_len` keys (the earlier keys come from a KV cache), so causality is aligned
bottom-right: query t may see keys 0 .. kv_len - q_len + t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(q_len: int, kv_len: int, device: torch.device | None = None) -> Tensor:
    """[q_len, kv_len] bool, True where the query may attend (bottom-right aligned)."""
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)
    k_idx = torch.arange(kv_len, device=device)
    return k_idx[None, :] <= q_idx[:, None]


def build_attention_mask(
    q_len: int,
    kv_len: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = True,
    bias: Tensor | None = None,
    device: torch.device | None = None,
    window_mask: Tensor | None = None,
) -> Tensor | None:
    """Combine causality, padding and bias into the `attn_mask` attention layers take.

    key_padding_mask: [B, kv_len], True (or 1) for real tokens.
    bias: additive float bias broadcastable to [B, H, q_len, kv_len] (e.g. ALiBi).
    window_mask: bool, broadcastable to [B, 1, q_len, kv_len], from `sliding_window_mask`.

    Returns None when there is nothing beyond causality to express, so attention can take the
    `is_causal` fast path; a bool [B, 1, q_len, kv_len] mask (True = attend) for padding; or
    the bias with -inf at forbidden places when a bias is given.

    Every query may always see its own key: a pad query would otherwise have no key at all
    and its softmax would be NaN, which poisons gradients even though its output is unused.
    A real query's own key is always allowed anyway, so this changes nothing for real tokens.
    """
    if key_padding_mask is None and bias is None and window_mask is None:
        return None
    for given in (key_padding_mask, bias, window_mask):
        if given is not None:
            device = given.device

    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)
    k_idx = torch.arange(kv_len, device=device)
    self_key = k_idx[None, :] == q_idx[:, None]
    allowed = causal_mask(q_len, kv_len, device) if causal else torch.ones_like(self_key)
    allowed = allowed[None, None]  # [1, 1, T, S]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    if window_mask is not None:
        allowed = allowed & window_mask
    allowed = allowed | self_key

    if bias is None:
        return allowed
    return bias.masked_fill(~allowed, float("-inf"))


def sliding_window_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    window: int,
    global_tokens: int = 0,
    causal: bool = True,
) -> Tensor:
    """Local attention: bool [B or 1, 1, q_len, kv_len], True where query may see key.

    q_pos [B or 1, q_len], k_pos [B or 1, kv_len] are positions counted over real tokens (as
    the models compute them), so a left-padded row gets the same window as the unpadded one.
    Causal: a query at position t sees keys t - window + 1 .. t (causality itself comes from
    `causal_mask`); bidirectional: keys with |t - s| < window. The first `global_tokens`
    positions are global (Longformer-style): every query sees them and they see every key.
    """
    distance = q_pos[..., :, None] - k_pos[..., None, :]
    near = distance < window if causal else distance.abs() < window
    if global_tokens > 0:
        near = near | (k_pos < global_tokens)[..., None, :] | (q_pos < global_tokens)[..., :, None]
    return near.unsqueeze(-3)
