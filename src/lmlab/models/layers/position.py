"""Position information: absolute (sinusoidal, learned), rotary (RoPE) and ALiBi.

All of them are indexed by explicit position ids rather than by token index, so a left-padded
prompt gets position 0 at its first real token and produces the same numbers as the unpadded
prompt. Tables are precomputed for `max_seq_len` positions; sinusoidal and rotary positions
past the table are computed from the formula (length extrapolation is a research question,
not an error), which callers request by passing `num_positions` larger than the table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/dim)), PE(pos, 2i+1) = cos(pos / base^(2i/dim))."""
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    angles = positions.to(torch.float32)[..., None] / base**exponents
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[..., :dim]  # an odd dim drops the last cosine


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed Vaswani et al. encodings, added to the token embeddings."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.dim = dim
        # Not persistent: it is a function of the config, so checkpoints need not carry it.
        self.register_buffer(
            "table", sinusoidal_table(torch.arange(max_seq_len), dim), persistent=False
        )

    def forward(self, position_ids: Tensor, num_positions: int | None = None) -> Tensor:
        """[..., T] ids -> [..., T, dim]. `num_positions` bounds the ids (exclusive)."""
        if num_positions is not None and num_positions > self.table.shape[0]:
            return sinusoidal_table(position_ids, self.dim)
        return self.table[position_ids]


class LearnedPositionalEmbedding(nn.Embedding):
    """One trained vector per absolute position; cannot go past `max_seq_len`."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__(max_seq_len, dim)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by cos/sin broadcastable to [B, 1, T, D]."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
# YaRN's ramp (Peng et al. 2023, the paper's values for Llama), in rotations a dimension makes
# over the original context: below ALPHA it is interpolated, above BETA it is left alone.
YARN_ALPHA, YARN_BETA = 1.0, 32.0


def rope_frequencies(
    head_dim: int,
    theta: float = 10000.0,
    scaling: str = "none",
    factor: float = 1.0,
    original_max_seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """Per-pair rotation frequencies theta^(-2j/D), rescaled for context extension by `factor`.

    Returns (inv_freq [D/2], attention scale for cos/sin). linear: position interpolation
    (Chen et al. 2023), every frequency / factor. ntk: NTK-aware base scaling, base *
    factor^(D/(D-2)) -- high frequencies (local order) stay, low ones stretch. yarn: per
    dimension, a ramp between interpolation and none by how often it turns within the original
    context, plus the attention temperature sqrt(1/t) = 0.1 ln(factor) + 1 on q and k.
    """
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown rope scaling {scaling!r} (valid: {', '.join(ROPE_SCALINGS)})")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    if scaling == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta**exponents
    scale = 1.0
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "yarn":
        if original_max_seq_len is None:
            raise ValueError("yarn scaling needs the original (trained) context length")
        rotations = original_max_seq_len * inv_freq / (2 * math.pi)
        keep = ((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
        inv_freq = (1 - keep) * inv_freq / factor + keep * inv_freq
        scale = 0.1 * math.log(factor) + 1.0
    return inv_freq, scale


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.) in the rotate-half layout used by Llama / HF.

    Dimension j of the first half is paired with dimension j + D/2 and rotated by
    pos * theta^(-2j/D), so q·k after rotation depends only on the relative position.
    `scaling` (see `rope_frequencies`) stretches it to a context `factor` times the trained one.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_seq_len: int | None = None,
    ):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        inv_freq, self.attention_scale = rope_frequencies(
            head_dim, theta, scaling, factor,
            max_seq_len if original_max_seq_len is None else original_max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = self._compute(torch.arange(max_seq_len))
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _compute(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_scale != 1.0:
            return emb.cos() * self.attention_scale, emb.sin() * self.attention_scale
        return emb.cos(), emb.sin()

    def cos_sin(
        self, position_ids: Tensor, num_positions: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """[B, T] ids -> cos, sin of shape [B, 1, T, D], ready to broadcast over heads.

        Computed once per forward and shared by every layer.
        """
        if num_positions is not None and num_positions > self.cos_cached.shape[0]:
            cos, sin = self._compute(position_ids)
        else:
            cos, sin = self.cos_cached[position_ids], self.sin_cached[position_ids]
        return cos.unsqueeze(-3), sin.unsqueeze(-3)

    def rotate(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q and k at `position_ids` in one call.

        Named `rotate`, not `apply`: `nn.Module.apply(fn)` recurses into children, and
        shadowing it would break `model.apply(init_fn)`. Reads the largest id to pick table or
        formula, a host sync, so the model calls `cos_sin` once per forward instead.
        """
        cos, sin = self.cos_sin(position_ids, int(position_ids.max()) + 1)
        return apply_rotary(q, k, cos, sin)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al.), geometric in 2^(-8/n).

    For a head count that is not a power of two, take the slopes of the nearest lower power
    of two and fill up with every other slope of the next power of two (as BLOOM / HF do).
    """

    def power_of_2_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_2_slopes(closest)
    if closest != n_heads:
        slopes += power_of_2_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Additive attention bias -slope_h * |q_pos - k_pos|.

    q_pos [B, T] (or [T]), k_pos [B, S] (or [S]) -> [B, H, T, S] (or [H, T, S]). For causal
    attention (k_pos <= q_pos) this is exactly -slope * (i - j); the absolute value makes the
    same function serve bidirectional encoders.
    """
    distance = (q_pos[..., :, None] - k_pos[..., None, :]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance.unsqueeze(-3)
