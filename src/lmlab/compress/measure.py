"""What compression changes, measured the same way before and after.

- parameters: logical parameter count (a tied weight once; bitsandbytes' packed 4-bit storage
  is not a parameter count, so quantized layers count their `in·out (+ out)` as before);
- size in bytes: the serialized state dict (`torch.save`), i.e. what a checkpoint of the model
  would take: quantized weights, their scales and quantization state included. Unstructured
  pruning leaves the dense size unchanged (zeros are stored); the sparsity says what a sparse
  format could drop;
- latency per generated token on the CPU: KV-cache generation of `n_tokens` tokens after a
  short prompt, timed `repeats` times after one warm-up, the median divided by `n_tokens`.
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import nn


def parameter_count(backbone: nn.Module) -> int:
    seen, total = set(), 0
    for module in backbone.modules():
        logical = _logical_linear_size(module)
        if logical is not None:
            total += logical
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _logical_linear_size(module: nn.Module) -> int | None:
    """in·out (+ out) for quantized Linear layers, whose stored tensors are packed."""
    quantized = type(module).__name__ in ("Linear8bitLt", "Linear4bit") or \
        type(module).__module__.startswith("torch.ao.nn.quantized")
    if not quantized or not hasattr(module, "in_features"):
        return None
    bias = module.bias() if callable(module.bias) else module.bias  # torch's is a method
    return module.in_features * module.out_features + (bias.numel() if bias is not None else 0)


def nonzero_count(layers: dict[str, nn.Linear]) -> int:
    return sum(int((m.weight != 0).sum()) for m in layers.values())


def size_in_bytes(backbone: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(backbone.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _generate_once(backbone: nn.Module, prompt: torch.Tensor, n_tokens: int) -> None:
    family = getattr(getattr(backbone, "config", None), "family", "decoder")
    if family == "encoder_decoder":
        from lmlab.models.seq2seq_generation import generate_seq2seq

        generate_seq2seq(backbone, prompt, torch.ones_like(prompt), max_new_tokens=n_tokens, bos_id=1,
                         eos_id=None, pad_id=0)
    else:
        from lmlab.models.generation import generate

        generate(backbone, prompt, max_new_tokens=n_tokens, eos_id=None)


def can_generate(backbone: nn.Module) -> bool:
    return getattr(getattr(backbone, "config", None), "family", "decoder") in ("decoder", "encoder_decoder")


def latency_per_token_ms(backbone: nn.Module, vocab_size: int, n_tokens: int = 8, repeats: int = 5,
                         prompt_len: int = 8, seed: int = 0) -> float | None:
    """Median CPU milliseconds per generated token (None for encoders: they do not generate)."""
    if not can_generate(backbone):
        return None
    generator = torch.Generator().manual_seed(seed)
    # Ids past the 6 specials, so the prompt is ordinary tokens.
    prompt = torch.randint(6, max(7, vocab_size), (1, prompt_len), generator=generator)
    with torch.inference_mode():
        _generate_once(backbone, prompt, n_tokens)  # warm-up: allocations, kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _generate_once(backbone, prompt, n_tokens)
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / n_tokens
