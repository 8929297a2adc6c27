"""Decoder-only language model (GPT / Llama style), assembled from `layers/`.

One class covers GPT-2 (learned positions, LayerNorm, GELU, MHA), Llama-like models (RoPE,
RMSNorm, SwiGLU, GQA), MQA and ALiBi variants: every choice is a `ModelConfig` field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.cache import KVCache, LayerKVCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.ffn import FeedForward
from lmlab.models.layers.mask import build_attention_mask
from lmlab.models.layers.norm import build_norm
from lmlab.models.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)


class DecoderBlock(nn.Module):
    """Pre-LN block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.attn = MultiHeadAttention(
            config.d_model,
            config.n_heads,
            config.kv_heads,
            bias=config.bias,
            dropout=config.dropout,
            attn_impl=config.attn_impl,
            causal=True,
        )
        self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.ffn = FeedForward(config.d_model, config.ffn_dim, config.ffn, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), attn_mask, rotary, kv_cache))
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))


class DecoderLM(nn.Module):
    """Causal LM: `forward(input_ids, attention_mask=None, cache=None) -> logits`.

    Logits span the padded vocabulary; ids >= `config.vocab_size` are padding that the
    tokenizer never produces (generation masks them out).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size <= 0:
            raise ConfigError("model.vocab_size", config.vocab_size, "the tokenizer's vocab size",
                              "must be set from the tokenizer before building the model")
        self.config = config
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, d)
        if config.position == "learned":
            self.pos_embed = LearnedPositionalEmbedding(config.max_seq_len, d)
        elif config.position == "sinusoidal":
            self.pos_embed = SinusoidalPositionalEmbedding(config.max_seq_len, d)
        if config.position == "rope":
            self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        if config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.norm = build_norm(config.norm, d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) everywhere, residual projections scaled down.

        Each block adds two projections into the residual stream, so o_proj/down_proj get
        std / sqrt(2 * n_layers) to keep the stream's variance independent of depth.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.ffn.down_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> logits [B, T, padded_vocab_size].

        attention_mask: [B, past + T], 1/True for real tokens (covers cached tokens too).
            Pass None when nothing is padded: that keeps attention on the fused causal path.
        cache: a `new_cache(...)` object; the new keys/values are appended to it.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        self._check_lengths(B, T, S, attention_mask, cache)

        key_positions = self._positions(attention_mask, S, input_ids.device)  # [B or 1, S]
        position_ids = key_positions[:, past:]
        h = self.embed_tokens(input_ids)
        if self.config.position == "learned":
            h = h + self.pos_embed(position_ids)
        elif self.config.position == "sinusoidal":
            h = h + self.pos_embed(position_ids, S).to(h.dtype)
        h = self.embed_dropout(h)

        rotary = self.rotary.cos_sin(position_ids, S) if self.config.position == "rope" else None
        bias = None
        if self.config.position == "alibi":
            bias = alibi_bias(self.alibi_slopes, position_ids, key_positions)
        attn_mask = build_attention_mask(T, S, attention_mask, causal=True, bias=bias,
                                         device=input_ids.device)

        for i, layer in enumerate(self.layers):
            h = layer(h, attn_mask, rotary, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm(h))

    @staticmethod
    def _positions(attention_mask: Tensor | None, S: int, device: torch.device) -> Tensor:
        """Position of every key: counted over real tokens, so left pads shift nothing.

        Pads before the first real token get position 0 (they are never attended to).
        """
        if attention_mask is None:
            return torch.arange(S, device=device)[None]
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def _check_lengths(self, B: int, T: int, S: int, attention_mask: Tensor | None,
                       cache: KVCache | None) -> None:
        if self.config.position == "learned" and S > self.config.max_seq_len:
            past = S - T
            raise ConfigError(
                "model.max_seq_len", self.config.max_seq_len, f"an integer >= {S}",
                f"a forward over {S} positions ({past} cached + {T} new) does not fit: learned "
                "position embeddings exist only for positions < max_seq_len")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have shape {(B, S)} (batch, cached + new "
                             f"tokens), got {tuple(attention_mask.shape)}")
        if cache is not None:
            cache.check_room(B, T)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for `max_len` positions (prompt + generated tokens)."""
        weight = self.embed_tokens.weight
        return KVCache(
            self.config.n_layers,
            batch_size,
            self.config.kv_heads,
            max_len,
            self.config.head_dim,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied embedding/lm_head weight is counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
