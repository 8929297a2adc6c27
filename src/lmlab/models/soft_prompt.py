"""Learned virtual tokens in front of a backbone's input (prompt tuning, Lester et al. 2021).

A backbone's `soft_prompt` is None unless `lmlab.peft.prompt` installs a module whose
`forward(batch_size)` gives the virtual-token embeddings [B, P, d_model] (P =
`n_virtual_tokens`). They are inserted before the first real token of each row (after any left
padding, so they always touch the text: a Mamba layer's convolution would otherwise see pads
between prompt and text), before embedding scaling and absolute positions, so they live where
token embeddings live. From there on they are ordinary positions: the real tokens' positions
shift by P. Attention masks always span the whole sequence, so a caller's mask (which knows
nothing of the prompt) is widened the same way (`widen_mask`); with a KV cache the prompt is
fed once, by the first forward, and stays in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn


class _Cache(Protocol):
    length: int


def _layout(mask: Tensor, P: int) -> tuple[Tensor, Tensor, Tensor]:
    """For a mask [B, S]: where the prompt goes in the widened [B, P + S] sequence (bool), the
    original index each other position comes from, and each row's number of leading pads."""
    S = mask.shape[1]
    lead = (mask.long().cumsum(1) == 0).sum(1, keepdim=True)  # [B, 1]
    j = torch.arange(S + P, device=mask.device)[None]
    is_prompt = (j >= lead) & (j < lead + P)
    source = torch.where(j < lead, j, j - P).clamp(0, S - 1)
    return is_prompt, source, lead


def widen_mask(mask: Tensor | None, P: int) -> Tensor | None:
    """A caller's mask [B, S] -> [B, P + S] with the prompt's P ones before the first real token."""
    if mask is None:
        return None
    is_prompt, source, _ = _layout(mask, P)
    return mask.gather(1, source).masked_fill(is_prompt, 1)


def prepend_soft_prompt(
    prompt: nn.Module, h: Tensor, attention_mask: Tensor | None, cache: _Cache | None = None
) -> tuple[Tensor, Tensor | None, Callable[[Tensor], Tensor] | None]:
    """h [B, T, d] -> (h with the prompt inserted unless `cache` already holds it, the widened
    mask, and a function taking outputs [B, P + T, ...] back to the input's T positions, or
    None when nothing was inserted)."""
    B, T, d = h.shape
    P = prompt.n_virtual_tokens
    if cache is not None and cache.length > 0:
        return h, widen_mask(attention_mask, P), None
    virtual = prompt(B).to(h.dtype)
    if attention_mask is None:
        return torch.cat([virtual, h], dim=1), None, lambda out: out[:, P:]
    S = P + T
    is_prompt, source, lead = _layout(attention_mask, P)
    offset = (torch.arange(S, device=h.device)[None] - lead).clamp(0, P - 1)
    inserted = torch.where(is_prompt[..., None],
                           virtual.gather(1, offset[..., None].expand(B, S, d)),
                           h.gather(1, source[..., None].expand(B, S, d)))
    mask = attention_mask.gather(1, source).masked_fill(is_prompt, 1)
    t = torch.arange(T, device=h.device)[None]
    keep = t + P * (t >= lead)  # where each input position ended up

    def take(out: Tensor) -> Tensor:
        return out.gather(1, keep[..., None].expand(B, T, out.shape[-1]))

    return inserted, mask, take
