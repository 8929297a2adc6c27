"""Bottleneck adapters: identity at init on every family, placement, only adapters train."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmlab import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.peft import build_peft_strategy, parameter_counts
from lmlab.peft.adapter import BottleneckAdapter

VOCAB = 50
FAMILIES = {
    "gpt": dict(),
    "gqa": dict(n_kv_heads=2, ffn="swiglu", norm="rmsnorm", position="rope", bias=False),
    "moe": dict(ffn="moe", n_experts=4, top_k=2),
    "mamba": dict(mixer="mamba", ffn="none", position="none"),
    "hybrid": dict(layer_pattern="MA", ffn="swiglu", position="none"),
    "bert": dict(family="encoder", norm_position="post", mlm_head=True),
    "transformer": dict(family="encoder_decoder", norm_position="post", position="sinusoidal", ffn="relu"),
    "t5": dict(family="encoder_decoder", position="relative", norm="rmsnorm", ffn="swiglu", bias=False),
}
# sublayers per block: (houlsby, pfeiffer) adapters for 2 layers (+2 decoder layers)
EXPECTED = {"gpt": (4, 2), "gqa": (4, 2), "moe": (4, 2), "mamba": (2, 2), "hybrid": (4, 2),
            "bert": (4, 2), "transformer": (10, 4), "t5": (10, 4)}


def _backbone(name, seed=0):
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, **FAMILIES[name]))


def _call(model, x):
    return model(x, None, x) if model.config.family == "encoder_decoder" else model(x)


def _adapter(**kw):
    return build_peft_strategy({"method": "adapter", "bottleneck": 8, **kw})


def test_adapter_module_is_identity_at_init_and_a_bottleneck_residual():
    adapter = BottleneckAdapter(16, 4, "gelu", 0.0)
    h = torch.randn(2, 5, 16)
    assert torch.equal(adapter(h), h)
    with torch.no_grad():
        adapter.up.weight.normal_()
    expected = h + F.linear(F.gelu(F.linear(h, adapter.down.weight, adapter.down.bias)),
                            adapter.up.weight, adapter.up.bias)
    torch.testing.assert_close(adapter(h), expected)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_identity_at_init_on_every_family(name, placement):
    model = _backbone(name).eval()
    x = torch.randint(6, VOCAB, (2, 9))
    base = _call(model, x)
    strategy = _adapter(placement=placement)
    strategy.apply(model)
    assert strategy.report()["adapters"] == EXPECTED[name][placement == "pfeiffer"]
    # Adding the zero update is exact; the matmul kernels after it may round differently.
    torch.testing.assert_close(_call(model, x), base, atol=1e-6, rtol=1e-6)


def _train(model, x, steps=6):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        logits = _call(model, x)
        if model.config.family == "encoder":
            logits = model.mlm_logits(logits)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["gqa", "mamba", "bert", "t5"])
def test_only_adapters_train_and_the_base_stays_bit_identical(name):
    model = _backbone(name)
    strategy = _adapter(activation="silu", dropout=0.1)
    strategy.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model, torch.randint(6, VOCAB, (4, 12)))
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n.endswith("up.weight"))
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)


def test_houlsby_places_adapters_after_attention_and_ffn_pfeiffer_after_ffn_only():
    houlsby = _backbone("gqa")
    _adapter().apply(houlsby)
    names = {n.rsplit(".adapter.", 1)[0] for n, _ in houlsby.named_parameters() if ".adapter." in n}
    assert names == {"layers.0.attn", "layers.0.ffn", "layers.1.attn", "layers.1.ffn"}
    pfeiffer = _backbone("t5")
    _adapter(placement="pfeiffer").apply(pfeiffer)
    names = {n.rsplit(".adapter.", 1)[0] for n, _ in pfeiffer.named_parameters() if ".adapter." in n}
    assert names == {f"{s}.layers.{i}.ffn" for s in ("encoder", "decoder") for i in (0, 1)}


def test_train_norms_and_copies_keep_the_hooks():
    model = _backbone("gqa").eval()
    _adapter(train_norms=True).apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("norm" in n for n in trainable) and all(".adapter." in n or "norm" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("up.weight"):
                p.normal_(0, 0.5)
    x = torch.randint(6, VOCAB, (2, 7))
    copied = copy.deepcopy(model)  # hooks are module-level functions: they survive copies
    torch.testing.assert_close(copied(x), model(x))
    with torch.no_grad():
        for n, p in copied.named_parameters():
            if ".adapter." in n:
                p.zero_()
    assert not torch.allclose(copied(x), model(x))


def test_cannot_merge_and_invalid_fields():
    strategy = _adapter()
    assert not strategy.can_merge and "non-linear" in strategy.cannot_merge_reason
    for field, value in [("bottleneck", 0), ("placement", "middle"), ("activation", "swish2"), ("dropout", 1.0)]:
        with pytest.raises(ConfigError, match=f"peft.{field}"):
            _adapter(**{field: value})


@pytest.mark.parametrize("name", ["gqa", "hybrid"])
def test_kv_cache_generation_matches_recomputation_with_adapters(name):
    from lmlab.models.generation import generate

    model = _backbone(name).eval()
    _adapter().apply(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("up.weight"):
                p.normal_(0, 0.3)
    prompt = torch.randint(6, VOCAB, (3, 5))
    cached = generate(model, prompt, max_new_tokens=8, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=8, use_cache=False))
