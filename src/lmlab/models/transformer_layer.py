"""One block of the encoder and encoder-decoder families, pre- or post-LN.

    encoder layer:  self-attention (bidirectional)                  -> FFN
    decoder layer:  self-attention (causal, KV-cached) -> cross-attention -> FFN

Each sublayer f is wrapped as `x + f(norm(x))` (pre-LN, GPT-2 / T5: trains without warmup at
depth) or `norm(x + f(x))` (post-LN, the original Transformer and BERT). The FFN comes from
`build_ffn`, so it is dense or a mixture of experts (`ffn=moe`) as in the decoder family, or
absent (`ffn=none`). Parameter names follow `DecoderBlock` (`attn_norm attn ffn_norm ffn`) plus
`cross_norm cross_attn`, so PEFT targets and weight-import maps are the same across families.
QK-norm applies to self-attention only; cross-attention keys are projected once per source.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lmlab.models.cache import LayerKVCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.cross_attention import CrossAttention
from lmlab.models.layers.ffn import FeedForward, build_ffn
from lmlab.models.layers.norm import build_norm


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention, FFN; see the module docstring."""

    def __init__(self, config: ModelConfig, causal: bool, cross_attention: bool = False,
                 layer_index: int = 0):
        super().__init__()
        d = config.d_model
        self.post_norm = config.norm_position == "post"
        self.attn_norm = build_norm(config.norm, d, config.norm_eps)
        self.attn = MultiHeadAttention(
            d, config.n_heads, config.kv_heads, bias=config.bias, dropout=config.dropout,
            attn_impl=config.attn_impl, causal=causal, qk_norm=config.qk_norm,
            norm_eps=config.norm_eps,
        )
        self.cross_norm: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if cross_attention:
            self.cross_norm = build_norm(config.norm, d, config.norm_eps)
            self.cross_attn = CrossAttention(
                d, config.n_heads, config.kv_heads, bias=config.bias, dropout=config.dropout,
                attn_impl=config.attn_impl,
            )
        self.ffn = build_ffn(config, layer_index)
        if self.ffn is not None:
            self.ffn_norm = build_norm(config.norm, d, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _sublayer(self, x: Tensor, norm: nn.Module, f: Callable[[Tensor], Tensor],
                  residual: Tensor | None = None) -> Tensor:
        """`residual` (default `x`): what f's output is added to, when f returns other rows
        than it reads (`output_rows`)."""
        residual = x if residual is None else residual
        if self.post_norm:
            return norm(residual + self.resid_dropout(f(x)))
        return residual + self.resid_dropout(f(norm(x)))

    @property
    def selects_rows(self) -> bool:
        """Whether `forward(..., output_rows=)` computes only those rows after attention: a
        self-attention layer with a dense FFN or none. A mixture of experts would route, drop
        (capacity) and balance a different set of tokens; a decoder layer's cross-attention
        (encoder-decoders) is left as it is."""
        return self.cross_attn is None and (self.ffn is None or isinstance(self.ffn, FeedForward))

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        kv_cache: LayerKVCache | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d_model]; memory_kv from `cross_attn.project_memory` (decoder layers);
        token_mask [B, T], 1 for real tokens, keeps pads out of MoE routing.

        output_rows: [N] indices into the B·T positions (row-major): returns [N, d_model], those
        positions' outputs only. Keys and values still come from every position; the output
        projection, residual, norms and FFN run on the N rows alone (`selects_rows` layers).
        """
        if output_rows is not None:
            if not self.selects_rows or kv_cache is not None:
                raise ValueError("output_rows needs a layer without cross-attention, KV cache or "
                                 "mixture of experts (see TransformerLayer.selects_rows)")
            x = self._sublayer(x, self.attn_norm,
                               lambda y: self.attn(y, attn_mask, rotary, output_rows=output_rows),
                               residual=x.flatten(0, 1).index_select(0, output_rows))
            # A dense FFN is position-wise: the rows need no token mask.
            return x if self.ffn is None else self._sublayer(x, self.ffn_norm, self.ffn)
        x = self._sublayer(x, self.attn_norm, lambda y: self.attn(y, attn_mask, rotary, kv_cache))
        if self.cross_attn is not None:
            if memory_kv is None:
                raise ValueError("a decoder layer with cross-attention needs memory_kv")
            cross_attn = self.cross_attn
            x = self._sublayer(x, self.cross_norm, lambda y: cross_attn(y, memory_kv, memory_mask))
        if self.ffn is None:
            return x
        ffn = self.ffn
        return self._sublayer(x, self.ffn_norm, lambda y: ffn(y, token_mask))

    @property
    def n_residual_writes(self) -> int:
        """How many sublayers add into the residual stream (for depth-scaled init)."""
        return 1 + (self.cross_attn is not None) + (self.ffn is not None)
