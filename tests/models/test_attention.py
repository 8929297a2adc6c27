"""SDPA vs eager vs an independent naive reference, for MHA / GQA / MQA and every mask kind."""

import math

import pytest
import torch

from lmlab.models.layers import (
    MultiHeadAttention,
    alibi_bias,
    alibi_slopes,
    build_attention_mask,
)

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
ATOL = 1e-5


def _padding(kind: str, B: int = 3, S: int = 7) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = [S, S - 2, S - 4]
    rows = [[1] * n + [0] * (S - n) for n in lengths]
    if kind == "left":
        rows = [r[::-1] for r in rows]
    return torch.tensor(rows[:B])


def naive_attention(attn: MultiHeadAttention, x, key_mask=None, slopes=None):
    """Independent reference: explicit per-group einsum, mask built from raw conditions.

    Shares no code with lmlab's attention or mask builder: GQA is expressed by viewing query
    heads as [kv_head, group] instead of repeating K/V, and the mask from index comparisons.
    """
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = torch.nn.functional.linear(x, attn.q_proj.weight, attn.q_proj.bias)
    k = torch.nn.functional.linear(x, attn.k_proj.weight, attn.k_proj.bias)
    v = torch.nn.functional.linear(x, attn.v_proj.weight, attn.v_proj.bias)
    q = q.reshape(B, T, Hkv, H // Hkv, D)
    k = k.reshape(B, T, Hkv, D)
    v = v.reshape(B, T, Hkv, D)
    scores = torch.einsum("bikgd,bjkd->bkgij", q, k) / math.sqrt(D)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i).expand(B, T, T)
    if key_mask is not None:
        pos = (key_mask.cumsum(-1) - 1).clamp(min=0)
        allowed = allowed & key_mask.bool()[:, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool)
    else:
        pos = torch.arange(T).expand(B, T)
    if slopes is not None:
        dist = (pos[:, :, None] - pos[:, None, :]).float()  # i - j >= 0 where allowed
        bias = -slopes.view(1, Hkv, H // Hkv, 1, 1) * dist[:, None, None]
        scores = scores + bias
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    out = torch.einsum("bkgij,bjkd->bikgd", scores.softmax(-1), v).reshape(B, T, H * D)
    return torch.nn.functional.linear(out, attn.o_proj.weight, attn.o_proj.bias)


def _module(impl, heads, kv_heads):
    torch.manual_seed(0)
    return MultiHeadAttention(32, heads, kv_heads, attn_impl=impl).eval()


def _mask_for(key_mask, T, alibi, H):
    bias = None
    if alibi:
        pos = (torch.arange(T)[None] if key_mask is None
               else (key_mask.cumsum(-1) - 1).clamp(min=0))
        bias = alibi_bias(alibi_slopes(H), pos, pos)
    return build_attention_mask(T, T, key_mask, causal=True, bias=bias)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("alibi", [False, True])
def test_sdpa_eager_and_naive_agree(heads, kv_heads, padding, alibi):
    sdpa, eager = _module("sdpa", heads, kv_heads), _module("eager", heads, kv_heads)
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 7, 32)
    key_mask = _padding(padding)
    mask = _mask_for(key_mask, 7, alibi, heads)
    out_sdpa, out_eager = sdpa(x, mask), eager(x, mask)
    ref = naive_attention(sdpa, x, key_mask, alibi_slopes(heads) if alibi else None)
    assert not out_sdpa.isnan().any()  # pad query rows included
    real = torch.ones(3, 7, dtype=torch.bool) if key_mask is None else key_mask.bool()
    torch.testing.assert_close(out_sdpa, out_eager, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_sdpa[real], ref[real], atol=ATOL, rtol=0)


def test_gqa_with_all_kv_heads_is_mha():
    mha = _module("sdpa", 4, None)
    gqa = _module("sdpa", 4, 4)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mha(x), gqa(x), atol=0, rtol=0)
    assert gqa.k_proj.out_features == 32 and _module("sdpa", 4, 1).k_proj.out_features == 8


def test_causality_future_tokens_do_not_change_the_past():
    attn = _module("sdpa", 4, 2)
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 32)
    torch.testing.assert_close(attn(x)[:, :4], attn(y)[:, :4], atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("alibi", [False, True])
def test_whole_model_sdpa_equals_eager(make_model, with_impl, heads, kv_heads, alibi, left_pad):
    sdpa = make_model(n_heads=heads, n_kv_heads=kv_heads, position="alibi" if alibi else "rope")
    eager = with_impl(sdpa, "eager")
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18]])
    torch.testing.assert_close(sdpa(ids), eager(ids), atol=ATOL, rtol=0)
    out_sdpa, out_eager = sdpa(ids, mask), eager(ids, mask)
    assert not out_sdpa.isnan().any()
    torch.testing.assert_close(out_sdpa, out_eager, atol=ATOL, rtol=0)


def test_right_padding_leaves_real_token_logits_unchanged(make_model):
    model = make_model(position="alibi")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(model(padded, mask)[:, :3], model(ids)[:, :3], atol=ATOL, rtol=0)
