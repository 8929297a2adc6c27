"""Cross-attention: decoder queries attend to the encoder's output ("memory").

A subclass of `MultiHeadAttention` rather than an option of it: it has the same projections
(`q_proj k_proj v_proj o_proj`, so PEFT and weight import see one set of names) but a different
data flow. Keys and values depend only on the memory, which is fixed for a whole generation,
so they are projected once (`project_memory`) and reused at every decoding step instead of
being cached token by token.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmlab.models.layers.attention import MultiHeadAttention, eager_attention, prepend_prefix
from lmlab.models.layers.fused_projection import concatenated_linear, fusable


class CrossAttention(MultiHeadAttention):
    """Attention from `x` [B, T, d_model] to precomputed memory keys/values."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        attn_impl: str = "sdpa",
    ):
        super().__init__(d_model, n_heads, n_kv_heads, bias=bias, dropout=dropout,
                         attn_impl=attn_impl, causal=False)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory [B, S, d_model] -> keys, values [B, n_kv_heads, S, head_dim]."""
        B, S, _ = memory.shape
        if fusable((self.k_proj, self.v_proj)):
            # unbind, not slicing: its backward writes both gradients into one tensor, where
            # each slice's would fill a zero tensor of the whole and add them.
            kv = concatenated_linear((self.k_proj, self.v_proj), memory)
            k, v = kv.view(B, S, 2, self.n_kv_heads, self.head_dim).unbind(2)
            return k.transpose(1, 2), v.transpose(1, 2)
        k = self.k_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """attn_mask: bool [B, 1, 1, S] (True = a real source token) or None (no padding)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = memory_kv
        if self.prefix_kv is not None:
            k, v, attn_mask = prepend_prefix(k, v, attn_mask, self.prefix_kv, T, causal=False)
        attend = F.scaled_dot_product_attention if self.attn_impl == "sdpa" else eager_attention
        out = attend(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
