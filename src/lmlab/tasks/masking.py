"""BERT-style masking of token batches, reproducible from a seed."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmlab.data.collate import IGNORE_INDEX


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose stream depends only on `keys` (e.g. seed, split, batch index)."""
    state = np.random.SeedSequence([abs(int(k)) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def bert_mask(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    mask_id: int,
    num_special: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """(masked input ids, labels): each real, non-special token is chosen with `mask_prob`; a
    chosen token becomes <mask> with `mask_token_prob`, a random ordinary token (never a
    special) with `random_token_prob`, else stays. Labels hold the original id at chosen
    positions and IGNORE_INDEX elsewhere, so the loss covers exactly the chosen tokens.

    Random numbers are drawn on the CPU from `generator` (a CPU generator cannot feed CUDA
    sampling) and moved to the batch's device: tiny next to a forward pass. A list of
    generators, one per row, draws each row's numbers from its own.
    """
    shape, device = input_ids.shape, input_ids.device
    if isinstance(generator, list):
        rows = [_draws((1, shape[1]), num_special, vocab_size, g) for g in generator]
        chosen_draw, kind_draw, random_ids = (torch.cat(parts).to(device) for parts in zip(*rows))
    else:
        chosen_draw, kind_draw, random_ids = (d.to(device) for d in _draws(shape, num_special, vocab_size, generator))
    eligible = input_ids >= num_special
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    chosen = eligible & (chosen_draw < mask_prob)
    to_mask = chosen & (kind_draw < mask_token_prob)
    to_random = chosen & (kind_draw >= mask_token_prob) & (kind_draw < mask_token_prob + random_token_prob)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def _draws(shape: tuple[int, ...], num_special: int, vocab_size: int,
           generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Which tokens are chosen, what becomes of them, and their random replacements."""
    return (torch.rand(shape, generator=generator), torch.rand(shape, generator=generator),
            torch.randint(num_special, vocab_size, shape, generator=generator))
