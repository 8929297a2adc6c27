"""Position encodings against their published formulas and defining properties."""

import math

import pytest
import torch

from lmlab.models.layers import (
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
)


def test_rope_keeps_norms():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=32)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    pos = torch.arange(10)[None].expand(2, 10)
    rq, rk = rope.rotate(q, k, pos)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))


def test_rope_dot_product_depends_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        rq, _ = rope.rotate(q, k, torch.tensor([[m]]))
        _, rk = rope.rotate(q, k, torch.tensor([[n]]))
        return (rq * rk).sum()

    for offset in (1, 7, 30):
        torch.testing.assert_close(score(3, 1), score(3 + offset, 1 + offset), atol=1e-5, rtol=0)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rope_matches_rotate_half_formula():
    D, theta = 8, 10000.0
    rope = RotaryEmbedding(head_dim=D, max_seq_len=16, theta=theta)
    x = torch.randn(1, 1, 1, D)
    pos = 5
    rx, _ = rope.rotate(x, x, torch.tensor([[pos]]))
    expected = torch.empty(D)
    for j in range(D // 2):  # pair (j, j + D/2) rotated by pos * theta^(-2j/D)
        angle = pos * theta ** (-2 * j / D)
        a, b = x[0, 0, 0, j], x[0, 0, 0, j + D // 2]
        expected[j] = a * math.cos(angle) - b * math.sin(angle)
        expected[j + D // 2] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(rx[0, 0, 0], expected, atol=1e-5, rtol=0)


def test_rope_past_the_table_uses_the_formula():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    long = RotaryEmbedding(head_dim=8, max_seq_len=64)
    pos = torch.arange(40)[None]
    for a, b in zip(rope.cos_sin(pos, 40), long.cos_sin(pos, 40)):
        torch.testing.assert_close(a, b)


def test_alibi_slopes_power_of_two():
    expected = torch.tensor([1 / 2**i for i in range(1, 9)])
    torch.testing.assert_close(alibi_slopes(8), expected)


@pytest.mark.parametrize("n_heads", [6, 12])
def test_alibi_slopes_non_power_of_two(n_heads):
    closest = 2 ** int(math.log2(n_heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-8 * (i + 1) / (2 * closest)) for i in range(0, 2 * closest, 2)]
    expected = torch.tensor(base + extra[: n_heads - closest])
    torch.testing.assert_close(alibi_slopes(n_heads), expected)
    if n_heads == 12:  # 1/2^1..1/2^8 then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
        assert alibi_slopes(12)[8:].tolist() == pytest.approx([2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5])


def test_alibi_slopes_match_hf_bloom():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for n in (4, 6, 8, 12):
        # BLOOM's tensor is slope * position; at position 1 it is the slope itself.
        hf = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]
        torch.testing.assert_close(alibi_slopes(n), hf)


def test_alibi_bias_formula():
    slopes = alibi_slopes(4)
    pos = torch.arange(5)
    bias = alibi_bias(slopes, pos[None], pos[None])
    assert bias.shape == (1, 4, 5, 5)
    for h in range(4):
        for i in range(5):
            for j in range(i + 1):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h].item() * (i - j))


def test_sinusoidal_formula():
    d = 16
    emb = SinusoidalPositionalEmbedding(max_seq_len=20, dim=d)
    table = emb(torch.arange(20))
    for pos in (0, 1, 7, 19):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    far = emb(torch.tensor([25]), num_positions=26)  # past the table: computed directly
    assert far[0, 0].item() == pytest.approx(math.sin(25), abs=1e-5)
