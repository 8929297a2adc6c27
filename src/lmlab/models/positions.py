"""A stack's position scheme, shared by `DecoderLM` and `TransformerStack`.

`PositionScheme` is the base of the module that owns the scheme: `init_positions` registers
what `config.position` needs under the names checkpoints and weight import know (`pos_embed`,
`rotary`, `alibi_slopes`, `relative_bias`); `embed_positions` scales token embeddings and adds
absolute positions; `position_terms` gives the attention layers their rotary tables and bias.
Positions are counted over real tokens (`real_token_positions`), so padding on either side
changes nothing for the real tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.cache import KVCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)
from lmlab.models.layers.relative_position import RelativePositionBias


def real_token_positions(attention_mask: Tensor | None, S: int, device: torch.device) -> Tensor:
    """[B or 1, S]: position of every key, counted over real tokens, so left pads shift nothing.

    Pads before the first real token get position 0 (they are never attended to).
    """
    if attention_mask is None:
        return torch.arange(S, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PositionScheme(nn.Module):
    """Base of a module with `config` and a position scheme; see the module docstring."""

    config: ModelConfig

    def init_positions(self, config: ModelConfig, causal: bool) -> None:
        d = config.d_model
        # Vaswani et al. scale embeddings by sqrt(d) so they are not drowned by the
        # unit-amplitude sinusoids when the embedding matrix is initialised small.
        self.embed_scale = math.sqrt(d) if config.scale_embeddings else 1.0
        if config.position == "learned":
            self.pos_embed = LearnedPositionalEmbedding(config.max_seq_len, d)
        elif config.position == "sinusoidal":
            self.pos_embed = SinusoidalPositionalEmbedding(config.max_seq_len, d)
        elif config.position == "rope":
            self.rotary = RotaryEmbedding(
                config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling,
                config.rope_scaling_factor, config.original_max_seq_len,
            )
        elif config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)
        elif config.position == "relative":
            self.relative_bias = RelativePositionBias(
                config.relative_buckets, config.n_heads, config.relative_max_distance,
                bidirectional=not causal,
            )

    def embed_positions(self, h: Tensor, position_ids: Tensor, S: int) -> Tensor:
        """Token embeddings [B, T, d] -> scaled, plus absolute positions if the scheme has them."""
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        if self.config.position == "learned":
            h = h + self.pos_embed(position_ids)
        elif self.config.position == "sinusoidal":
            h = h + self.pos_embed(position_ids, S).to(h.dtype)
        return h

    def position_terms(self, position_ids: Tensor, key_positions: Tensor,
                       S: int) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
        """(rotary cos/sin for the new positions, additive attention bias), each None if unused.

        The bias (ALiBi or relative) is computed once and shared by all layers.
        """
        rotary = self.rotary.cos_sin(position_ids, S) if self.config.position == "rope" else None
        bias = None
        if self.config.position == "alibi":
            bias = alibi_bias(self.alibi_slopes, position_ids, key_positions)
        elif self.config.position == "relative":
            bias = self.relative_bias(position_ids, key_positions)
        return rotary, bias

    def check_lengths(self, B: int, T: int, S: int, attention_mask: Tensor | None,
                      cache: KVCache | None, span: str) -> None:
        """B rows of T new tokens after S - T cached ones; `span` says so in the error message."""
        if self.config.position == "learned" and S > self.config.max_seq_len:
            raise ConfigError(
                "model.max_seq_len", self.config.max_seq_len, f"an integer >= {S}",
                f"{span} does not fit: learned position embeddings exist only for positions "
                "< max_seq_len")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have shape {(B, S)} (batch, cached + new "
                             f"tokens), got {tuple(attention_mask.shape)}")
        if cache is not None:
            cache.check_room(B, T)
