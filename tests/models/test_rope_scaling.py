"""RoPE context extension (linear interpolation, NTK-aware, YaRN) against its formulas."""

import math

import pytest
import torch

from lmlab.models import DecoderLM, ModelConfig
from lmlab.models.layers.position import (
    YARN_ALPHA,
    YARN_BETA,
    RotaryEmbedding,
    rope_frequencies,
)

HEAD_DIM = 16
POSITIONS = torch.arange(40)[None]


def plain_cos_sin(positions: torch.Tensor, theta: float = 10000.0):
    """RoPE from its definition: angle pos * theta^(-2j/D) on pairs (j, j + D/2)."""
    j = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    angles = positions.double()[..., None] * theta ** (-2 * j / HEAD_DIM)
    angles = torch.cat([angles, angles], -1)
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn"])
def test_factor_one_is_plain_rope(scaling):
    rope = RotaryEmbedding(HEAD_DIM, 32, scaling=scaling, factor=1.0, original_max_seq_len=32)
    cos, sin = rope.cos_sin(POSITIONS, 40)
    ref_cos, ref_sin = plain_cos_sin(POSITIONS)
    torch.testing.assert_close(cos[:, 0], ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, 0], ref_sin, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_linear_scaling_is_plain_rope_at_positions_over_factor(factor):
    rope = RotaryEmbedding(HEAD_DIM, 64, scaling="linear", factor=factor)
    cos, sin = rope.cos_sin(POSITIONS)
    ref_cos, ref_sin = plain_cos_sin(POSITIONS / factor)
    torch.testing.assert_close(cos[:, 0], ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, 0], ref_sin, atol=1e-5, rtol=0)


def test_ntk_scales_the_base():
    inv_freq, scale = rope_frequencies(HEAD_DIM, 10000.0, "ntk", 4.0)
    base = 10000.0 * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2))
    expected = base ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert scale == 1.0
    assert inv_freq[0] == 1.0  # the highest frequency (local order) is untouched


def test_yarn_ramps_between_interpolation_and_none():
    factor, original = 4.0, 1024
    plain, _ = rope_frequencies(HEAD_DIM, 10000.0)
    inv_freq, scale = rope_frequencies(HEAD_DIM, 10000.0, "yarn", factor, original)
    rotations = original * plain / (2 * math.pi)
    fast, slow = rotations > YARN_BETA, rotations < YARN_ALPHA
    assert fast.any() and slow.any()
    torch.testing.assert_close(inv_freq[fast], plain[fast])  # many turns: kept
    torch.testing.assert_close(inv_freq[slow], plain[slow] / factor)  # < 1 turn: interpolated
    mid = ~fast & ~slow
    assert ((inv_freq[mid] < plain[mid]) & (inv_freq[mid] > plain[mid] / factor)).all()
    assert scale == pytest.approx(0.1 * math.log(factor) + 1)
    rope = RotaryEmbedding(HEAD_DIM, 64, scaling="yarn", factor=factor, original_max_seq_len=original)
    cos, sin = rope.cos_sin(POSITIONS)
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, scale**2))


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn"])
def test_scaled_model_runs_past_its_trained_length(scaling):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, position="rope",
                         max_seq_len=16, rope_scaling=scaling, rope_scaling_factor=4.0)
    logits = DecoderLM(config).eval()(torch.randint(0, 50, (1, 64)))
    assert torch.isfinite(logits).all()
