"""oneDNN-prepacked linears and the fused q/k/v projection compute what the plain layers do."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models import generate, prepack
from lmlab.models.cache import KVCache
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.position import RotaryEmbedding
from lmlab.models.prepack import prepack_available, prepacked_linears, reordered_weight

pytestmark = pytest.mark.skipif(not prepack_available(), reason="torch built without oneDNN")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def prepack_every_size(monkeypatch):
    """Tiny test weights are below the size worth prepacking: prepack them all the same."""
    monkeypatch.setattr(prepack, "MIN_PREPACKED_NUMEL", 0)


def test_small_weights_stay_on_plain_linear(monkeypatch):
    monkeypatch.setattr(prepack, "MIN_PREPACKED_NUMEL", 1 << 17)
    model = nn.ModuleList([nn.Linear(64, 64), nn.Linear(384, 512)])
    attn = MultiHeadAttention(32, 4, 2)
    with prepacked_linears(nn.ModuleList([model, attn])) as n:
        assert n == 2 and "forward" in model[1].__dict__ and "forward" not in model[0].__dict__
        x = torch.randn(2, 3, 32)
        torch.testing.assert_close(attn.qkv_proj(x), torch.cat(
            [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))


@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_f_linear(bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    inputs = [torch.randn(5, 24), torch.randn(3, 1, 24), torch.randn(2, 7, 24)[:, ::2]]
    expected = [F.linear(x, layer.weight, layer.bias) for x in inputs]
    with torch.no_grad(), prepacked_linears(layer) as n:
        assert n == 1 and "forward" in layer.__dict__
        got = [layer(x) for x in inputs]
    assert "forward" not in layer.__dict__
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_forwards_are_restored_after_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="boom"), prepacked_linears(model):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model)


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_only_plain_fp32_unhooked_linears_are_switched():
    hooked = nn.Linear(4, 4)
    hooked.register_forward_pre_hook(lambda m, args: None)
    model = nn.ModuleList([nn.Linear(4, 4), Scaled(4, 4), hooked, nn.Linear(4, 4).double()])
    with prepacked_linears(model) as n:
        assert n == 1 and "forward" in model[0].__dict__
        assert all("forward" not in m.__dict__ for m in model[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16), prepacked_linears(model) as n:
        assert n == 0  # autocast picks linear's dtype; the prepacked op would bypass it
    with prepacked_linears(model, enabled=False) as n:
        assert n == 0


def test_reordered_weight_is_reused_until_the_weight_changes():
    layer = nn.Linear(8, 8)
    first = reordered_weight(layer.weight)
    assert reordered_weight(layer.weight) is first
    with torch.no_grad():
        layer.weight.mul_(3)  # as an optimizer step would: in place
    x = torch.randn(2, 8)
    with torch.no_grad(), prepacked_linears(layer):
        assert reordered_weight(layer.weight) is not first
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **TOL)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_fused_qkv_attention_equals_separate_projections(qk_norm, bias, attn_impl):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, 2, bias=bias, attn_impl=attn_impl, qk_norm=qk_norm).eval()
    rope = RotaryEmbedding(8, 64)
    x = torch.randn(2, 6, 32)

    def run():
        cache = KVCache(1, 2, 2, 6, 8)
        outs = []
        for start, end in ((0, 4), (4, 5), (5, 6)):  # prefill, then single-token steps
            rotary = rope.cos_sin(torch.arange(start, end)[None], end)
            outs.append(attn(x[:, start:end], rotary=rotary, kv_cache=cache.layers[0]))
            cache.advance(end - start)
        return torch.cat(outs, 1)

    with torch.no_grad():
        expected = run()
        with prepacked_linears(attn):
            assert "qkv_proj" in attn.__dict__
            assert all("forward" not in p.__dict__ for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            assert "forward" in attn.o_proj.__dict__
            fused = run()
    assert "qkv_proj" not in attn.__dict__
    torch.testing.assert_close(fused, expected, **TOL)


@pytest.mark.parametrize("overrides", [
    dict(position="rope", n_kv_heads=2, bias=False, ffn="swiglu", norm="rmsnorm"),
    dict(position="learned", bias=True, tie_embeddings=True),
    dict(position="alibi", n_kv_heads=1, qk_norm=True),
])
def test_generation_with_and_without_prepacking_agree(make_model, left_pad, overrides):
    model = make_model(init_std=0.2, **overrides)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]])
    packed = generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(packed, generate(model, ids, mask, max_new_tokens=8, prepack=False))
    assert torch.equal(packed, generate(model, ids, mask, max_new_tokens=8, use_cache=False))


def test_generation_sees_weights_changed_by_training(make_model):
    model = make_model(n_kv_heads=2, init_std=0.2)
    prompt = torch.randint(1, 50, (2, 4))
    generate(model, prompt, max_new_tokens=4)  # packs the weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    model(prompt).logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    assert torch.equal(generate(model, prompt, max_new_tokens=6),
                       generate(model, prompt, max_new_tokens=6, prepack=False))


def test_fused_optimizer_steps_are_seen_after_clear_prepacked(make_model):
    """Fused AdamW (lmlab's default) writes the weights without bumping their version counters,
    so the cache key cannot see its steps: evaluation starts with `clear_prepacked()`."""
    model = make_model(n_kv_heads=2, init_std=0.2)
    prompt = torch.randint(1, 50, (2, 4))
    generate(model, prompt, max_new_tokens=4)  # packs the weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    versions = [p._version for p in model.parameters()]
    model.train()
    model(prompt).logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    assert [p._version for p in model.parameters()] == versions  # the hazard
    prepack.clear_prepacked()
    assert torch.equal(generate(model, prompt, max_new_tokens=6),
                       generate(model, prompt, max_new_tokens=6, prepack=False))


def test_tasks_clear_prepacked_weights_before_every_evaluation(make_model):
    from lmlab.tasks.base import LMTask

    model = make_model(n_kv_heads=2)  # kept alive: the caches hold its weights weakly
    for hook in (LMTask.on_validation_epoch_start, LMTask.on_test_epoch_start,
                 LMTask.on_predict_epoch_start):
        generate(model, torch.randint(1, 50, (2, 4)), max_new_tokens=2)
        assert len(prepack._REORDERED) > 0
        hook(None)
        assert len(prepack._REORDERED) == 0 and len(prepack._FUSED) == 0


class _Subclass(torch.Tensor):
    """Stands for FSDP2's DTensor weights: any tensor subclass keeps its own linear."""


def test_tensor_subclass_weights_are_left_alone():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.Tensor._make_subclass(_Subclass, layer.weight.detach()))
    model = nn.ModuleList([layer, nn.Linear(4, 4)])
    with prepacked_linears(model) as n:
        assert n == 1 and "forward" not in model[0].__dict__
