"""Family-agnostic building blocks shared by every backbone assembly."""

from lmlab.models.layers.attention import MultiHeadAttention, eager_attention
from lmlab.models.layers.ffn import FeedForward, build_ffn
from lmlab.models.layers.mamba import MambaMixer
from lmlab.models.layers.mask import build_attention_mask, causal_mask, sliding_window_mask
from lmlab.models.layers.moe import MoEFeedForward
from lmlab.models.layers.norm import build_norm
from lmlab.models.layers.position import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
)

__all__ = [
    "FeedForward",
    "MambaMixer",
    "MoEFeedForward",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "build_attention_mask",
    "build_ffn",
    "build_norm",
    "causal_mask",
    "sliding_window_mask",
    "eager_attention",
]
