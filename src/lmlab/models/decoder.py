"""Decoder-only language model (GPT / Llama style), assembled from `layers/`.

One class covers GPT-2 (learned positions, LayerNorm, GELU, MHA), Llama-like models (RoPE,
RMSNorm, SwiGLU, GQA), MQA and ALiBi variants, mixtures of experts, Mamba and Jamba-like
hybrids of attention and Mamba layers: every choice is a `ModelConfig` field.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.cache import KVCache, LayerKVCache, LayerSSMCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.ffn import build_ffn
from lmlab.models.layers.mamba import MambaMixer
from lmlab.models.layers.mask import build_attention_mask, sliding_window_mask
from lmlab.models.layers.moe import collect_auxiliary_losses, collect_expert_load
from lmlab.models.layers.norm import build_norm
from lmlab.models.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)
from lmlab.models.layers.relative_position import RelativePositionBias

# Linear layers that write into the residual stream (depth-scaled at init).
RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "out_proj.weight")


class DecoderBlock(nn.Module):
    """Pre-LN block: x + mixer(norm(x)), then + ffn(norm(x)).

    The token mixer of layer `layer_index` (`config.layer_mixers`) is attention (`attn_norm`,
    `attn`) or Mamba (`mamba_norm`, `mamba`); its FFN is dense, MoE or absent (`build_ffn`).
    """

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.mixer_kind = config.layer_mixers[layer_index]
        if self.mixer_kind == "mamba":
            self.mamba_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.mamba = MambaMixer(
                config.d_model, config.d_state, config.d_conv, config.expand,
                config.ssm_dt_rank, bias=config.bias, chunk_size=config.ssm_chunk_size)
        else:
            self.attn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.attn = MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.kv_heads,
                bias=config.bias,
                dropout=config.dropout,
                attn_impl=config.attn_impl,
                causal=True,
                qk_norm=config.qk_norm,
                norm_eps=config.norm_eps,
            )
        ffn = build_ffn(config, layer_index)
        if ffn is not None:
            self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.ffn = ffn
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        kv_cache: LayerKVCache | LayerSSMCache | None = None,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        """kv_cache: this layer's slot of the model's cache (K/V or Mamba state).
        token_mask: [B, T], 1 for real tokens; Mamba and MoE keep pads out of their state."""
        if self.mixer_kind == "mamba":
            mixed = self.mamba(self.mamba_norm(x), token_mask, kv_cache)
        else:
            mixed = self.attn(self.attn_norm(x), attn_mask, rotary, kv_cache)
        x = x + self.resid_dropout(mixed)
        if self.ffn is None:
            return x
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x), token_mask))


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
            self.rotary = RotaryEmbedding(
                config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling,
                config.rope_scaling_factor, config.original_max_seq_len)
        if config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)
        if config.position == "relative":
            self.relative_bias = RelativePositionBias(
                config.relative_buckets, config.n_heads, config.relative_max_distance,
                bidirectional=False)
        self.embed_scale = math.sqrt(d) if config.scale_embeddings else 1.0
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config.norm, d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) everywhere, residual projections scaled down.

        Each block adds two projections into the residual stream, so o_proj/down_proj (every
        expert's, Mamba's out_proj) get std / sqrt(2 * n_layers) to keep the stream's variance
        independent of depth. Mamba's SSM parameters then get their own init.
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
        for name, param in self.layers.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=residual_std)
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.reset_ssm_parameters()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> logits [B, T, padded_vocab_size]; arguments as in `hidden`."""
        return self.lm_head(self.hidden(input_ids, attention_mask, cache))

    def hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, d_model] (lm_head's input).

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
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        if self.config.position == "learned":
            h = h + self.pos_embed(position_ids)
        elif self.config.position == "sinusoidal":
            h = h + self.pos_embed(position_ids, S).to(h.dtype)
        h = self.embed_dropout(h)

        rotary = self.rotary.cos_sin(position_ids, S) if self.config.position == "rope" else None
        bias = None
        if self.config.position == "alibi":
            bias = alibi_bias(self.alibi_slopes, position_ids, key_positions)
        elif self.config.position == "relative":
            bias = self.relative_bias(position_ids, key_positions)
        window = None
        if self.config.sliding_window is not None and S > self.config.sliding_window:
            window = sliding_window_mask(position_ids, key_positions, self.config.sliding_window,
                                         self.config.global_tokens)
        attn_mask = build_attention_mask(T, S, attention_mask, causal=True, bias=bias,
                                         device=input_ids.device, window_mask=window)
        token_mask = attention_mask[:, past:] if attention_mask is not None else None

        for i, layer in enumerate(self.layers):
            h = layer(h, attn_mask, rotary, cache.layers[i] if cache is not None else None,
                      token_mask)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

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
        """An empty cache for `max_len` positions (prompt + generated tokens): K/V for the
        attention layers, a constant-size recurrent state for the Mamba layers."""
        weight = self.embed_tokens.weight
        config = self.config
        return KVCache(
            config.n_layers,
            batch_size,
            config.kv_heads,
            max_len,
            config.head_dim,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
            ssm_layers=[i for i, kind in enumerate(config.layer_mixers) if kind == "mamba"],
            ssm_dims=(config.d_inner, config.d_conv, config.d_state),
        )

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted MoE losses of the last forward ({} without MoE layers); add to the loss."""
        return collect_auxiliary_losses(self)

    def expert_load(self) -> Tensor | None:
        """[n_moe_layers, n_experts] fraction of routing decisions per expert, last forward."""
        return collect_expert_load(self)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied embedding/lm_head weight is counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
