"""Multi-head attention with grouped key/value heads (MHA, GQA and MQA are one class).

`n_kv_heads == n_heads` is MHA, `1` is MQA, anything between is GQA: query head h reads
key/value head h // (n_heads / n_kv_heads). The fast path is
`F.scaled_dot_product_attention` (flash / memory-efficient kernels, native GQA); `eager` is
the explicit softmax(QK^T / sqrt(d) + mask) V reference that tests compare against. On the
CPU, two cases of `sdpa` run lmlab's own kernels where SDPA's are slow: a learned bias with a
gradient (`biased_attention`) and causal training at 128-1024 tokens (`causal_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.layers import biased_attention as learned_bias
from lmlab.models.layers import causal_attention as causal_blocks
from lmlab.models.layers.fused_projection import concatenated_linear, fusable
from lmlab.models.layers.mask import causal_mask
from lmlab.models.layers.position import apply_rotary, rotate_half
from lmlab.models.layers.rms_norm import RMSNorm

if TYPE_CHECKING:
    from lmlab.models.cache import LayerKVCache

ATTN_IMPLS = ("sdpa", "eager")

# Gives a layer's learned prefix keys and values, each [1 or B, n_kv_heads, P, head_dim].
PrefixKV = Callable[[], tuple[Tensor, Tensor]]
# x [B, T, d_model] -> [B, T, (n_heads + 2 * n_kv_heads) * head_dim]: q, k and v in one matmul.
QKVProjection = Callable[[Tensor], Tensor]


def prepend_prefix(
    k: Tensor, v: Tensor, attn_mask: Tensor | None, prefix: PrefixKV, q_len: int, causal: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Put prefix keys/values (prefix tuning) before `k`/`v` [B, Hkv, S, D] and widen the mask.

    Prefix keys are visible to every query: causality, padding and windows concern real
    positions only, and an additive bias (ALiBi, T5 buckets) is 0 on them, because a prefix
    has no position (it is not rotated either: it comes after RoPE and the KV cache).
    """
    prefix_k, prefix_v = prefix()
    B, S, P = k.shape[0], k.shape[-2], prefix_k.shape[-2]
    k = torch.cat([prefix_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=-2)
    v = torch.cat([prefix_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=-2)
    if attn_mask is None:
        if not (causal and q_len > 1):
            return k, v, None
        attn_mask = causal_mask(q_len, S, k.device)
    shape = (*attn_mask.shape[:-1], P)
    visible = (attn_mask.new_ones(shape) if attn_mask.dtype == torch.bool
               else attn_mask.new_zeros(shape))
    return k, v, torch.cat([visible, attn_mask], dim=-1)


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> Tensor:
    """Same contract as `F.scaled_dot_product_attention`, written out step by step.

    q [B, Hq, T, D], k/v [B, Hkv, S, D]; a bool mask is True where attention is allowed, a
    float mask is added to the scores. `is_causal` is top-left aligned, as in SDPA.
    """
    if enable_gqa and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # Scores and softmax in fp32: this is the reference, precision matters more than speed.
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v.float()).to(q.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention over `x`, optionally extending a KV cache.

    `causal` is the layer's default masking when the caller passes no `attn_mask` (no padding,
    no bias); a caller-built mask (see `layers.mask.build_attention_mask`) already encodes
    causality and replaces it.

    `prefix_kv` (None unless prefix tuning installs one, see `lmlab.peft.prefix`) gives learned
    keys/values that every query attends to before the sequence's own (`prepend_prefix`).

    q_proj, k_proj and v_proj read the same input, so they are computed as one matmul over
    their concatenated weights whenever they are plain `nn.Linear`s (`fused_projection.fusable`;
    the parameters stay three modules): one larger GEMM forward, one d(input) GEMM backward
    instead of three plus the adds that sum them. Adapted (LoRA), quantised, hooked (pruning,
    ZeRO-3) or sharded projections are called one by one.

    `qkv_proj` (None except while `lmlab.models.prepack.prepacked_linears` runs a generation)
    replaces that matmul with one on prepacked weights; q and k are then rotated as one tensor.
    Same values, fewer and larger ops per decode step.
    """

    prefix_kv: PrefixKV | None = None
    qkv_proj: QKVProjection | None = None

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        attn_impl: str = "sdpa",
        causal: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads != 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"need n_kv_heads | n_heads | d_model, got "
                             f"{n_kv_heads}, {n_heads}, {d_model}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r} (valid: {', '.join(ATTN_IMPLS)})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.attn_impl = attn_impl
        self.causal = causal
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        # QK-norm (Dehghani et al. 2023, OLMo-2): per-head RMSNorm on q and k bounds the
        # attention logits, which keeps them from blowing up at high learning rates.
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        kv_cache: LayerKVCache | None = None,
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d_model] -> [B, T, d_model], or [N, d_model] with `output_rows`.

        attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, T, S] where
            S = cached + T keys; None = no padding and no bias.
        rotary: (cos, sin) for the T new positions, from `RotaryEmbedding.cos_sin`.
        kv_cache: this layer's cache; new keys/values are appended and all are attended.
        output_rows: [N] indices into the B·T positions (row-major) whose outputs are wanted:
            every position still attends as usual, only the output projection runs on these.
        """
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v, rotary = self._fused_qkv(x, rotary)
        else:
            q, k, v = self._project_qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        if self.prefix_kv is not None:
            k, v, attn_mask = prepend_prefix(k, v, attn_mask, self.prefix_kv, T, self.causal)
        S = k.shape[-2]

        # Decisions on shapes only (never on tensor values), so torch.compile can trace them.
        is_causal = False
        if attn_mask is None and self.causal and T > 1:
            if S == T:
                is_causal = True  # the kernels' own causal path: no mask tensor at all
            else:
                attn_mask = causal_mask(T, S, x.device)  # SDPA's is_causal is top-left aligned
        elif attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype

        dropout_p = self.dropout if self.training else 0.0
        if self.attn_impl == "sdpa" and learned_bias.applies(q, k, attn_mask, dropout_p):
            # A bias with a gradient (T5's relative positions) sends SDPA to its math path.
            out = learned_bias.learned_bias_attention(q, k, v, attn_mask, causal=self.causal,
                                                      dropout_p=dropout_p)
        elif self.attn_impl == "sdpa" and causal_blocks.applies(q, k, is_causal, attn_mask,
                                                                dropout_p):
            # CPU training: SDPA's fused CPU kernel runs its products at ~1/3 of FMA peak.
            out = causal_blocks.causal_block_attention(q, k, v)
        else:
            attend = F.scaled_dot_product_attention if self.attn_impl == "sdpa" else eager_attention
            out = attend(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if output_rows is not None:
            out = out.flatten(0, 1).index_select(0, output_rows)
        return self.o_proj(out)

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, n_heads, T, D], k and v [B, n_kv_heads, T, D]."""
        B, T, _ = x.shape
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if fusable(parts):
            # Split along the features, before the head views: split's backward is one cat
            # into d(qkv); slices of a [B, H, T, D] view would each fill a zero tensor of the
            # whole and add them.
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = concatenated_linear(parts, x).split(
                [self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:  # LoRA, quantised, hooked or sharded projections: each computes its own
            q, k, v = (p(x) for p in parts)
        return (q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))

    def _fused_qkv(
        self, x: Tensor, rotary: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """q, k, v [B, H, T, D] from `qkv_proj`, and the rotary terms still to apply (None
        once applied here: without QK-norm, q and k are rotated together, as `apply_rotary`
        would rotate each)."""
        B, T, _ = x.shape
        n_q, n_qk = self.n_heads, self.n_heads + self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, n_qk + self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Slices of the head view are fine here: generation runs without autograd, so they have
        # no backward (the zero-filled gradients that make `_project_qkv` split instead).
        qk, v = qkv[:, :n_qk], qkv[:, n_qk:]
        if rotary is not None and self.q_norm is None:
            cos, sin = rotary
            if cos.dtype != qk.dtype:
                cos, sin = cos.to(qk.dtype), sin.to(qk.dtype)
            qk = qk * cos + rotate_half(qk) * sin
            rotary = None
        return qk[:, :n_q], qk[:, n_q:], v, rotary
