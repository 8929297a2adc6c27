"""A stack of `TransformerLayer`s with its position scheme: the encoder and decoder halves.

`EncoderModel` is one bidirectional stack; `EncoderDecoderModel` is a bidirectional stack plus
a causal stack with cross-attention. The stack takes token embeddings (the models own the
embedding matrix, so source and target can share it) and returns hidden states. Positions
are counted over real tokens, as in `DecoderLM`, so padding on either side changes nothing
for the real tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.cache import KVCache
from lmlab.models.config import ModelConfig
from lmlab.models.decoder import DecoderLM
from lmlab.models.layers.mask import build_attention_mask, sliding_window_mask
from lmlab.models.layers.norm import build_norm
from lmlab.models.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)
from lmlab.models.layers.relative_position import RelativePositionBias
from lmlab.models.transformer_layer import TransformerLayer

# Linear weights that write into the residual stream.
RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight")


class TransformerStack(nn.Module):
    """Positions + `n_layers` blocks + the stack's norm.

    Pre-LN stacks end with `norm` (the residual stream is never normalised otherwise);
    post-LN stacks already end every block in a norm and instead normalise the embeddings
    (`embed_norm`, as BERT does), which keeps the first block's input at unit scale.
    """

    def __init__(self, config: ModelConfig, n_layers: int, causal: bool,
                 cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.causal = causal
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
        self.post_norm = config.norm_position == "post"
        if self.post_norm:
            self.embed_norm = build_norm(config.norm, d, config.norm_eps)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(config, causal, cross_attention, layer_index=i)
            for i in range(n_layers)
        )
        if not self.post_norm:
            self.norm = build_norm(config.norm, d, config.norm_eps)

    def forward(
        self,
        h: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        memory_kv: list[tuple[Tensor, Tensor]] | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """h: token embeddings [B, T, d_model] -> hidden states [B, T, d_model].

        attention_mask: [B, past + T], 1 for this stack's real tokens; None = no padding.
        cache: the self-attention KV cache (causal stacks), extended by T positions.
        memory_kv: per layer, the cross-attention keys/values from `project_memory`.
        memory_mask: [B, S_src], 1 for real source tokens; None = no source padding.
        """
        B, T, _ = h.shape
        past = cache.length if cache is not None else 0
        S = past + T
        self._check_lengths(B, T, S, attention_mask, cache)

        key_positions = DecoderLM._positions(attention_mask, S, h.device)  # [B or 1, S]
        position_ids = key_positions[:, past:]
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        if self.config.position == "learned":
            h = h + self.pos_embed(position_ids)
        elif self.config.position == "sinusoidal":
            h = h + self.pos_embed(position_ids, S).to(h.dtype)
        if self.post_norm:
            h = self.embed_norm(h)
        h = self.embed_dropout(h)

        rotary = self.rotary.cos_sin(position_ids, S) if self.config.position == "rope" else None
        bias = None
        if self.config.position == "alibi":
            bias = alibi_bias(self.alibi_slopes, position_ids, key_positions)
        elif self.config.position == "relative":
            bias = self.relative_bias(position_ids, key_positions)  # once, shared by all layers
        window = None
        if self.config.sliding_window is not None:
            window = sliding_window_mask(position_ids, key_positions, self.config.sliding_window,
                                         self.config.global_tokens, causal=self.causal)
        attn_mask = build_attention_mask(T, S, attention_mask, causal=self.causal, bias=bias,
                                         device=h.device, window_mask=window)
        cross_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        token_mask = attention_mask[:, past:] if attention_mask is not None else None

        for i, layer in enumerate(self.layers):
            h = layer(
                h, attn_mask, rotary,
                kv_cache=cache.layers[i] if cache is not None else None,
                memory_kv=memory_kv[i] if memory_kv is not None else None,
                memory_mask=cross_mask,
                token_mask=token_mask,
            )
        if cache is not None:
            cache.advance(T)
        return h if self.post_norm else self.norm(h)

    def project_memory(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every layer, computed once per source batch."""
        return [layer.cross_attn.project_memory(memory) for layer in self.layers]

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None,
                  dtype: torch.dtype | None) -> KVCache:
        return KVCache(len(self.layers), batch_size, self.config.kv_heads, max_len,
                       self.config.head_dim, device=device, dtype=dtype)

    @property
    def n_residual_writes(self) -> int:
        return sum(layer.n_residual_writes for layer in self.layers)

    def _check_lengths(self, B: int, T: int, S: int, attention_mask: Tensor | None,
                       cache: KVCache | None) -> None:
        if self.config.position == "learned" and S > self.config.max_seq_len:
            raise ConfigError(
                "model.max_seq_len", self.config.max_seq_len, f"an integer >= {S}",
                f"a sequence of {S} positions does not fit: learned position embeddings "
                "exist only for positions < max_seq_len")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have shape {(B, S)} (batch, cached + new "
                             f"tokens), got {tuple(attention_mask.shape)}")
        if cache is not None:
            cache.check_room(B, T)


def init_weights(model: nn.Module, std: float, stacks: list[TransformerStack]) -> None:
    """GPT-2 style init: N(0, std) weights, zero biases, residual projections scaled down.

    Every projection into a stack's residual stream (`o_proj`, `down_proj`, every expert's)
    gets std / sqrt(number of sublayers writing into it), so the stream's variance does not
    grow with depth (a decoder layer has three: self-attention, cross-attention and FFN).
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
    for stack in stacks:
        residual_std = std / math.sqrt(stack.n_residual_writes)
        for name, param in stack.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=residual_std)
