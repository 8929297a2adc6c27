"""Family-agnostic building blocks shared by every backbone assembly."""

from lmlab.models.layers.attention import MultiHeadAttention, eager_attention
from lmlab.models.layers.ffn import FeedForward
from lmlab.models.layers.mask import build_attention_mask, causal_mask
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
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "build_attention_mask",
    "build_norm",
    "causal_mask",
    "eager_attention",
]
