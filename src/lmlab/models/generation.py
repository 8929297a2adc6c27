"""Autoregressive generation for decoder backbones, with or without a KV cache.

The cached loop is one prefill forward and then one single-token forward per step; what it
does per step is kept small because at batch sizes that fit a CPU or a small GPU a decode step
is a few hundred tiny ops (see README, Performance):

- prompts with no padding run with no attention mask at all (a single new query may see every
  cached key, so it needs neither a mask nor `is_causal`); padded prompts get one mask
  allocated for the whole generation, of which each step passes a view;
- lmlab decoders compute the output layer for the last prompt position only at prefill;
- without `eos_id` nothing is tracked per row and nothing is read back to the host per step;
  with it, off CPU, whether all rows are done is read back every 8 steps (`EOS_CHECK_EVERY`);
- on CPU in fp32, linear layers use oneDNN-prepacked weights (`lmlab.models.prepack`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmlab.models.decoder import DecoderLM
from lmlab.models.prepack import prepacked_linears
from lmlab.models.sampling import choose_next, mask_padded_vocab

# Steps between checks whether every row has emitted eos, by device type: each check is a
# host sync, which costs nothing on CPU and a pipeline stall on an accelerator.
EOS_CHECK_EVERY = {"cpu": 1}
EOS_CHECK_EVERY_DEFAULT = 8


def is_sharded(model: nn.Module) -> bool:
    """Whether the weights are sharded over ranks: FSDP2 (DTensor parameters) or DeepSpeed
    ZeRO-3 (`ds_id` parameters). Every forward of such a model is a collective (the weights
    are gathered layer by layer)."""
    return any(type(p.detach()) is not torch.Tensor or hasattr(p, "ds_id")
               for p in model.parameters())


def inference_context(model: nn.Module):
    """`torch.inference_mode` (no version counters or view tracking: faster than `no_grad`),
    except for sharded models, which gather the weights into tensors they reuse in training:
    an inference tensor there fails the next training step (ZeRO-3: every later checkpoint's
    weight check)."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def all_rows_done(done: Tensor, sharded: bool) -> bool:
    """`done.all()` read on the host; for a sharded model, every rank's: each rank decodes its
    own share of an evaluation split (`lmlab.data.eval_sharding`), whose rows end at different
    steps, and each forward is a collective, so a rank stopping alone would leave the others
    waiting in their next forward."""
    flag = done.all()
    if sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = flag.to(torch.int32)  # no MIN over bool in gloo
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


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
    prepack: bool = True,
) -> Tensor:
    """Continue each prompt; return only the new tokens, LongTensor [B, max_new_tokens].

    prompt_ids [B, P] may be LEFT-padded, with prompt_mask [B, P] 0 at the pads (right
    padding would put pads between prompt and continuation). After a row emits `eos_id` its
    later positions are `pad_id`; the loop stops once every row is done. `vocab_size`
    (default: `model.config.vocab_size`) excludes the ids that only pad the vocabulary.

    use_cache=True runs one prefill forward and then one single-token forward per step;
    use_cache=False recomputes the whole sequence every step (the reference).
    prepack: on CPU in fp32, run the model's `nn.Linear`s on oneDNN-prepacked weights (kept
    for the next call while the weights are unchanged: one extra copy of them in memory).
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
        with inference_context(model), prepacked_linears(model, prepack):
            _decode_loop(model, prompt_ids, prompt_mask, out, eos_id, pad_id, vocab_size,
                         dict(temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator), use_cache)
    finally:
        model.train(was_training)
    return out


def last_logits(model: nn.Module, ids: Tensor, mask: Tensor | None, cache: Any) -> Tensor:
    """Logits [B, V] of the last position of `ids` (extending `cache` if given).

    An lmlab `DecoderLM` applies its output layer to that position only: at prefill the
    other P - 1 positions' logits ([B, P - 1, V], the largest matmul of the prefill) are never
    used. Other backbones (HF models may scale or cap their logits) run their own forward.
    """
    if isinstance(model, DecoderLM) and type(model).forward is DecoderLM.forward:
        return model.lm_head(model.hidden(ids, mask, cache)[:, -1])
    return model(ids, attention_mask=mask, cache=cache)[:, -1]


def _next_ids(logits: Tensor, vocab_size: int | None, sampling: dict[str, Any]) -> Tensor:
    if sampling["temperature"] == 0.0 and vocab_size is not None:
        # argmax over the real ids: the same choice as masking the padded ones, no copy.
        return logits[..., :vocab_size].argmax(dim=-1)
    return choose_next(mask_padded_vocab(logits, vocab_size), **sampling)


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
    device = prompt_ids.device
    # The last generated token is never fed back, so P + n_new - 1 positions suffice.
    total = P + n_new - 1
    mask = None
    # One host sync per call: an all-real prompt needs no mask, so the model skips building
    # (and attention skips applying) one every step.
    if prompt_mask is not None and not bool(prompt_mask.bool().all()):
        mask = torch.ones(B, total, dtype=torch.long, device=device)
        mask[:, :P] = prompt_mask
    done = None if eos_id is None else torch.zeros(B, dtype=torch.bool, device=device)
    eos_check_every = EOS_CHECK_EVERY.get(device.type, EOS_CHECK_EVERY_DEFAULT)
    sharded = is_sharded(model)

    cache = model.new_cache(B, total) if use_cache else None
    sequence = None
    if not use_cache:
        sequence = torch.empty(B, total, dtype=prompt_ids.dtype, device=device)
        sequence[:, :P] = prompt_ids
    logits = last_logits(model, prompt_ids, None if mask is None else mask[:, :P], cache)
    for step in range(n_new):
        next_ids = _next_ids(logits, vocab_size, sampling)
        if done is None:
            out[:, step] = next_ids
        else:
            # Finished rows report pad_id but keep feeding the chosen (valid) id: pad_id may
            # be outside the vocabulary (e.g. -100), and those rows' outputs are discarded.
            out[:, step] = next_ids.masked_fill(done, pad_id)
            done |= next_ids == eos_id
            # Reading `done` back waits for the device: off CPU only every few steps (the
            # extra steps write pad_id, which `out` holds there already).
            if step % eos_check_every == eos_check_every - 1 and all_rows_done(done, sharded):
                return
        if step == n_new - 1:
            return
        length = P + step + 1
        step_mask = None if mask is None else mask[:, :length]
        if use_cache:
            logits = last_logits(model, next_ids[:, None], step_mask, cache)
        else:
            sequence[:, length - 1] = next_ids
            logits = last_logits(model, sequence[:, :length], step_mask, None)
