"""Causal self-attention for CPU training, in blocks of query rows that skip the masked keys.

SDPA's fused CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`) runs its products at
about a third of this CPU's FMA peak: one fp32 causal layer of the bench model (B 8, 6 heads,
2 KV heads, T 256, head_dim 64) took 25-34 ms forward + backward, three quarters of it in the
backward. Here the same computation is written as batched GEMMs over blocks of 64 query rows,
each against the keys up to its last query (the keys after it are masked anyway: ~40 % of the
score work at T = 256 is never done), with the grouped query heads of a KV head stacked into
one GEMM (GQA without repeating k and v), and a written-out backward that reuses the
forward's probabilities instead of recomputing them: 19-25 ms for the same layer, eager or
compiled (an autograd Function: torch.compile traces it without a graph break).

`applies` says when: a training call (gradients wanted) on the CPU in fp32/fp64 without
autocast, causal with no mask, no dropout, and 128 <= T <= 1024. bf16 keeps SDPA, whose
reduced-precision handling stays the reference, except on a CPU without bf16 GEMM kernels:
there SDPA's bf16 backward multiplies on a scalar loop, and `lmlab.precision` sends SDPA to its
fp32 kernel on the bf16-rounded q, k, v anyway, output rounded to bf16. The same computation
here (bf16 q, k, v widened, exactly; fp32 blocks; the output rounded to bf16) takes 35 instead
of 46 ms of CPU time per layer forward + backward at the bench model's shape. It applies with or
without that emulation (a model called under plain bf16 autocast, or with bf16 weights, gets it
too: faster than the bf16 kernel here, and more precise). Its saved fp32 probabilities (and fp32
q, k, v and output) then sit beside bf16 activations, so the relative memory growth is about
twice the fp32 figures that follow. Below T = 128, one block skips nothing. Above 1024, the
saved probabilities (~0.55·B·H·T² floats a layer) cost more memory than the time is worth:
the bench model's saved activations (6 layers, head_dim 64, B·T = 2048) grow by 16 % at
T = 256, 43 % at 1024, 79 % at 2048. Whole bench-model steps (6 layers, B·T = 2048, 2
threads), with it against SDPA: T = 1024 1.06×, T = 2048 1.04×. Recomputing the probabilities in backward from a saved
log-sum-exp instead (SDPA's memory) was slower than SDPA at every length measured (256-2048).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The learned-bias path's block size (64 measured fastest at T = 256) and precisions.
from lmlab.models.layers.biased_attention import FULL_PRECISION, ROWS_PER_BLOCK
from lmlab.precision import CPU_BF16_EMULATED

MIN_T, MAX_T = 128, 1024


def applies(q: Tensor, k: Tensor, is_causal: bool, attn_mask: Tensor | None,
            dropout_p: float) -> bool:
    """Whether `causal_block_attention` should replace SDPA for this call (shapes and flags
    only, never tensor values, so torch.compile can trace the decision)."""
    T = q.shape[-2]
    full_precision = q.dtype in FULL_PRECISION and not torch.is_autocast_enabled("cpu")
    emulated_bf16 = q.dtype == torch.bfloat16 and CPU_BF16_EMULATED
    return (is_causal and attn_mask is None and dropout_p == 0.0
            and q.device.type == "cpu" and (full_precision or emulated_bf16)
            and k.dtype == q.dtype
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
            and MIN_T <= T <= MAX_T and k.shape[-2] == T and q.shape[1] % k.shape[1] == 0)


def causal_block_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d + causal mask) v; q [B, H, T, D], k and v [B, H_kv, T, D] with
    H a multiple of H_kv (query head h uses KV head h // (H / H_kv), as SDPA's enable_gqa).
    bf16 inputs are computed in fp32 and the output rounded to bf16 (module docstring)."""
    if q.dtype != torch.bfloat16:
        return CausalBlockAttention.apply(q, k, v)
    # Autocast off: its bf16 products would round the probabilities (and, on this CPU, run on
    # the scalar loop this path avoids).
    with torch.autocast("cpu", enabled=False):
        return CausalBlockAttention.apply(q.float(), k.float(), v.float()).to(torch.bfloat16)


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(t0, min(t0 + ROWS_PER_BLOCK, T)) for t0 in range(0, T, ROWS_PER_BLOCK)]


def _masks(n: int, device: torch.device) -> Tensor:
    """True above the diagonal of an n x n block: a key after its query."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, float, Tensor, Tensor, Tensor]:
    """(H_kv, query heads per KV head, 1/√d, queries [B·H_kv, group, T, D], keys and values
    [B·H_kv, T, D])."""
    B, H, T, D = q.shape
    Hk = k.shape[1]
    return (Hk, H // Hk, 1.0 / math.sqrt(D), q.reshape(B * Hk, H // Hk, T, D),
            k.reshape(B * Hk, T, D), v.reshape(B * Hk, T, D))


class CausalBlockAttention(torch.autograd.Function):
    """Rows of block b of every query head of a group are stacked: [B·H_kv, group·n, D], so
    each block is two GEMMs forward and four backward against the keys [0, end of block)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, T, D = q.shape
        Hk, group, scale, queries, keys, values = _grouped(q, k, v)
        out = q.new_empty(B * Hk, group, T, D)
        probs = []
        for t0, t1 in _blocks(T):
            n = t1 - t0
            block_q = queries[:, :, t0:t1].reshape(B * Hk, group * n, D) * scale
            scores = torch.bmm(block_q, keys[:, :t1].transpose(1, 2))
            # Only the block's own keys [t0, t1) can lie after a query of the block.
            scores.view(B * Hk, group, n, t1)[..., t0:t1].masked_fill_(_masks(n, q.device),
                                                                       float("-inf"))
            p = torch.softmax(scores, dim=-1)
            out[:, :, t0:t1] = torch.bmm(p, values[:, :t1]).view(B * Hk, group, n, D)
            probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # A backward called inside autocast (PyTorch advises against it) still multiplies in
        # the forward's precision.
        with torch.autocast("cpu", enabled=False):
            return CausalBlockAttention._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, *probs = ctx.saved_tensors
        B, H, T, D = q.shape
        Hk, group, scale, queries, keys, values = _grouped(q, k, v)
        d_out = d_out.reshape(B * Hk, group, T, D)
        # d(scores) = p · (d(p) − Σ_j p_j d(p)_j), and Σ_j p_j d(p)_j = d(out) · out per row.
        row_dot = (d_out * out).sum(-1)
        d_q = torch.empty_like(queries)
        d_k, d_v = torch.zeros_like(keys), torch.zeros_like(values)
        for (t0, t1), p in zip(_blocks(T), probs):
            n = t1 - t0
            block_d_out = d_out[:, :, t0:t1].reshape(B * Hk, group * n, D)
            block_q = queries[:, :, t0:t1].reshape(B * Hk, group * n, D) * scale
            # bmm then add: baddbmm_ into the keys' prefix view falls back to one small GEMM
            # per batch entry here.
            d_v[:, :t1] += torch.bmm(p.transpose(1, 2), block_d_out)
            d_scores = torch.bmm(block_d_out, values[:, :t1].transpose(1, 2))
            d_scores.sub_(row_dot[:, :, t0:t1].reshape(B * Hk, group * n, 1)).mul_(p)
            d_q[:, :, t0:t1] = torch.bmm(d_scores, keys[:, :t1]).mul_(scale).view(
                B * Hk, group, n, D)
            d_k[:, :t1] += torch.bmm(d_scores.transpose(1, 2), block_q)
        return d_q.view(B, H, T, D), d_k.view(B, Hk, T, D), d_v.view(B, Hk, T, D)
