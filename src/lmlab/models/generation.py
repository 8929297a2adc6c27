"""Autoregressive generation for decoder backbones, with or without a KV cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmlab.models.sampling import choose_next, mask_padded_vocab


def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue each prompt; return only the new tokens, LongTensor [B, max_new_tokens].

    prompt_ids [B, P] may be LEFT-padded, with prompt_mask [B, P] 0 at the pads (right
    padding would put pads between prompt and continuation). After a row emits `eos_id` its
    later positions are `pad_id`; the loop stops once every row is done. `vocab_size`
    (default: `model.config.vocab_size`) excludes the ids that only pad the vocabulary.

    use_cache=True runs one prefill forward and then one single-token forward per step;
    use_cache=False recomputes the whole sequence every step (the reference).
    """
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    B, P = prompt_ids.shape
    device = prompt_ids.device
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    if max_new_tokens <= 0:
        return out

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _decode_loop(model, prompt_ids, prompt_mask, out, eos_id, pad_id, vocab_size,
                         dict(temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator), use_cache)
    finally:
        model.train(was_training)
    return out


def _decode_loop(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None,
    out: Tensor,
    eos_id: int | None,
    pad_id: int,
    vocab_size: int | None,
    sampling: dict[str, Any],
    use_cache: bool,
) -> None:
    """Fill `out` in place, step by step."""
    B, P = prompt_ids.shape
    n_new = out.shape[1]
    mask = None if prompt_mask is None else prompt_mask.to(torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    new_real = torch.ones(B, 1, dtype=torch.long, device=prompt_ids.device)

    # The last generated token is never fed back, so P + n_new - 1 positions suffice.
    cache = model.new_cache(B, P + n_new - 1) if use_cache else None
    sequence = prompt_ids
    logits = model(prompt_ids, attention_mask=mask, cache=cache)[:, -1]
    for step in range(n_new):
        next_ids = choose_next(mask_padded_vocab(logits, vocab_size), **sampling)
        # Finished rows report pad_id but keep feeding the chosen (valid) id: pad_id may be
        # outside the vocabulary (e.g. -100), and those rows' outputs are discarded anyway.
        out[:, step] = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        if eos_id is not None:
            done = done | (next_ids == eos_id)
            if bool(done.all()):
                return
        if step == n_new - 1:
            return
        if mask is not None:
            mask = torch.cat([mask, new_real], dim=1)
        if use_cache:
            logits = model(next_ids[:, None], attention_mask=mask, cache=cache)[:, -1]
        else:
            sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
            logits = model(sequence, attention_mask=mask)[:, -1]
