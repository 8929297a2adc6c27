"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p).

Filters set excluded logits to -inf and keep the shape, so they compose in any order and
work on a whole batch at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mask_padded_vocab(logits: Tensor, vocab_size: int | None) -> Tensor:
    """Exclude ids >= vocab_size: rows the model has only to round the vocabulary up."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (more only when several tie with the k-th)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p.

    A token is dropped when the tokens ranked above it already hold probability >= p, so the
    most likely token always survives and the token that crosses p is kept (as in HF).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> ids [B]. temperature 0 is greedy (top-k/top-p then change nothing)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
