"""q/k/v as one matmul in training: same values and gradients as the separate projections and as
a naive reference; LoRA-wrapped and hooked projections keep their own forward and still train."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import lmlab.models.layers.attention as attention
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.position import RotaryEmbedding

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
VARIANTS = [  # rotary, qk_norm, bias
    (False, False, True),
    (True, False, False),
    (True, True, True),
]


def naive_attention(attn: MultiHeadAttention, x, cos=None, sin=None):
    """Causal attention written out in [B, T, H, D] layout, sharing no code with lmlab's:
    per-head RMS norm and the rotation by explicit formulas, GQA by repeating K/V heads."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).reshape(B, T, H, D)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).reshape(B, T, Hkv, D)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).reshape(B, T, Hkv, D)
    if attn.q_norm is not None:
        def rms(t, norm):
            return t * (t.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt() * norm.weight
        q, k = rms(q, attn.q_norm), rms(k, attn.k_norm)
    if cos is not None:
        c, s = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, T, 1, D]

        def rotate(t):
            return t * c + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * s
        q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, T, H * D)
    return F.linear(out, attn.o_proj.weight, attn.o_proj.bias)


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times attention computed q/k/v with one matmul."""
    calls = []
    real = attention.concatenated_linear
    monkeypatch.setattr(attention, "concatenated_linear",
                        lambda *args: calls.append(1) or real(*args))
    return calls


def _forward_backward(attn, x, rotary, grad_out):
    out = attn(x, rotary=rotary)
    params = [x, *attn.parameters()]
    return out, torch.autograd.grad(out, params, grad_out)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("rotary,qk_norm,bias", VARIANTS)
def test_training_step_with_one_qkv_matmul_equals_separate_projections(
        monkeypatch, fused_calls, heads, kv_heads, rotary, qk_norm, bias):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, heads, kv_heads, bias=bias, qk_norm=qk_norm).train()
    if qk_norm:  # away from their all-ones init, so a swapped q/k norm would show
        for norm in (attn.q_norm, attn.k_norm):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(2, 7, 32, requires_grad=True)
    cos_sin = RotaryEmbedding(8, 16).cos_sin(torch.arange(7)[None], 7) if rotary else None
    grad_out = torch.randn(2, 7, 32)

    fused, fused_grads = _forward_backward(attn, x, cos_sin, grad_out)
    assert len(fused_calls) == 1
    out = naive_attention(attn, x, *(cos_sin or ()))
    naive_grads = torch.autograd.grad(out, [x, *attn.parameters()], grad_out)
    monkeypatch.setattr(attention, "fusable", lambda parts: False)
    separate, separate_grads = _forward_backward(attn, x, cos_sin, grad_out)
    assert len(fused_calls) == 1

    torch.testing.assert_close(fused, separate)
    torch.testing.assert_close(fused, out, atol=1e-5, rtol=1e-5)
    names = ["x", *(n for n, _ in attn.named_parameters())]
    for name, f, s, n in zip(names, fused_grads, separate_grads, naive_grads, strict=True):
        torch.testing.assert_close(f, s, msg=name)
        torch.testing.assert_close(f, n, atol=1e-5, rtol=1e-5, msg=name)


def test_one_qkv_matmul_traces_into_one_compiled_graph(fused_calls):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, 2, bias=False, qk_norm=True)
    cos_sin = RotaryEmbedding(8, 16).cos_sin(torch.arange(6)[None], 6)
    x = torch.randn(2, 6, 32)
    compiled = torch.compile(attn, fullgraph=True, backend="eager")  # fails on a graph break
    torch.testing.assert_close(compiled(x, rotary=cos_sin), attn(x, rotary=cos_sin))
    assert len(fused_calls) == 2  # traced once, run once eagerly


def _train(attn, x, steps=3):
    optimizer = torch.optim.SGD([p for p in attn.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(steps):
        loss = attn(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_wrapped_projection_keeps_its_own_forward_and_trains(fused_calls):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, 2, bias=False)
    plain = copy.deepcopy(attn)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), attn)
    assert type(attn.q_proj) is not torch.nn.Linear  # peft's lora.Linear
    torch.nn.init.normal_(attn.q_proj.lora_B["default"].weight)
    x = torch.randn(2, 6, 32)
    out = attn(x)
    assert fused_calls == []
    # Reference: the LoRA update merged into a plain layer (which takes the fused path).
    lora = attn.q_proj
    with torch.no_grad():
        plain.q_proj.weight += (lora.scaling["default"] * lora.lora_B["default"].weight
                                @ lora.lora_A["default"].weight)
    torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)
    assert fused_calls == [1]
    frozen = attn.q_proj.base_layer.weight.detach().clone()
    losses = _train(attn, x)
    assert losses[-1] < losses[0]
    assert torch.equal(attn.q_proj.base_layer.weight, frozen)


def test_pruned_projection_keeps_its_mask_hook_and_trains(fused_calls):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, 2)
    prune.random_unstructured(attn.k_proj, "weight", amount=0.5)  # a forward pre-hook
    mask = attn.k_proj.weight_mask.clone()
    x = torch.randn(2, 6, 32)
    _train(attn, x, steps=2)
    assert fused_calls == []
    grad = torch.autograd.grad(attn(x).pow(2).mean(), attn.k_proj.weight_orig)[0]
    assert grad[mask.bool()].abs().sum() > 0 and torch.all(grad[~mask.bool()] == 0)
    # The pruned weight, as the hook sets it, equals a plain layer with the masked weight.
    plain = MultiHeadAttention(32, 4, 2)
    state = {k: v for k, v in attn.state_dict().items() if not k.startswith("k_proj.weight")}
    plain.load_state_dict({**state, "k_proj.weight": attn.k_proj.weight_orig * mask})
    torch.testing.assert_close(attn(x), plain(x), atol=1e-6, rtol=1e-5)
