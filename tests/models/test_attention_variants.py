"""Sliding-window attention (with global tokens) and QK-norm against naive references, and
windowed KV-cache generation against full recomputation."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import DecoderLM, ModelConfig, generate
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.mask import build_attention_mask, sliding_window_mask

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
ATOL = 1e-5


def naive_local_attention(attn: MultiHeadAttention, x, window, global_tokens=0, causal=True):
    """One query at a time over the keys its window allows, written from the definition."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D)
    k = attn.k_proj(x).view(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
    v = attn.v_proj(x).view(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
    if attn.q_norm is not None:
        q = F.rms_norm(q, (D,), attn.q_norm.weight, attn.q_norm.eps)
        k = F.rms_norm(k, (D,), attn.k_norm.weight, attn.k_norm.eps)
    out = torch.zeros(B, T, H, D)
    for t in range(T):
        keys = [s for s in range(T)
                if (s <= t or not causal)
                and (abs(t - s) < window or s < global_tokens or t < global_tokens)]
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, keys]) / math.sqrt(D)
        out[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, keys])
    return attn.o_proj(out.reshape(B, T, H * D))


def _attention(seed=0, n_kv_heads=2, attn_impl="sdpa", qk_norm=False, causal=True):
    torch.manual_seed(seed)
    attn = MultiHeadAttention(32, 4, n_kv_heads, attn_impl=attn_impl, qk_norm=qk_norm,
                              causal=causal).eval()
    if qk_norm:  # non-trivial norm gains, so the test sees whether they are applied
        torch.nn.init.uniform_(attn.q_norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(attn.k_norm.weight, 0.5, 1.5)
    return attn


def _window_mask(T, window, global_tokens=0, causal=True):
    pos = torch.arange(T)[None]
    local = sliding_window_mask(pos, pos, window, global_tokens, causal)
    return build_attention_mask(T, T, causal=causal, window_mask=local)


@pytest.mark.parametrize("window", [9, 12, 50])
def test_window_at_least_t_equals_full_attention(window):
    attn = _attention()
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x, _window_mask(9, window)), attn(x), atol=ATOL, rtol=0)
    model = DecoderLM(ModelConfig(**TINY, sliding_window=window)).eval()
    full = DecoderLM(ModelConfig(**TINY)).eval()
    full.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(model(ids), full(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window,global_tokens", [(1, 0), (3, 0), (4, 2), (2, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_equals_naive_reference(attn_impl, window, global_tokens, causal):
    attn = _attention(attn_impl=attn_impl, causal=causal)
    x = torch.randn(2, 10, 32)
    out = attn(x, _window_mask(10, window, global_tokens, causal))
    ref = naive_local_attention(attn, x, window, global_tokens, causal)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_qk_norm_equals_naive_reference():
    attn = _attention(qk_norm=True)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), naive_local_attention(attn, x, window=100),
                               atol=ATOL, rtol=0)


def test_tokens_outside_the_window_have_no_influence():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**TINY, "n_layers": 1}, sliding_window=3,
                                  position="rope")).eval()
    ids = torch.randint(1, 50, (1, 10))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 50
    a, b = model(ids), model(changed)
    # One layer, window 3: position t reads t-2..t, so token 0 reaches positions 0..2 only.
    torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=0, rtol=0)
    assert not torch.allclose(a[:, 2], b[:, 2])


@pytest.mark.parametrize("extra", [dict(sliding_window=3), dict(sliding_window=2, global_tokens=2),
                                   dict(sliding_window=3, qk_norm=True, position="rope")])
def test_windowed_cache_equals_full_forward(extra):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**TINY, **extra)).eval()
    ids = torch.randint(0, 50, (2, 11))
    full = model(ids)
    cache = model.new_cache(2, 11)
    pieces = [model(ids[:, :4], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("extra", [dict(sliding_window=3), dict(sliding_window=2, global_tokens=1)])
def test_windowed_generation_equals_recomputation(extra, left_pad):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**TINY, init_std=0.2, position="rope", **extra)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(prompts)
    cached = generate(model, ids, mask, max_new_tokens=7)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=7, use_cache=False))
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=7)
        assert torch.equal(cached[row], alone[0]), (row, cached[row], alone[0])
