"""LoRA through `peft` on lmlab's backbone: identity at init, merge exactness, only adapters train."""

from __future__ import annotations

import pytest
import torch

from lmlab import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.peft import build_peft_strategy, parameter_counts


def _backbone(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn="swiglu", norm="rmsnorm",
               position="rope", bias=False)
    cfg.update(kw)
    return build_backbone(ModelConfig(**cfg))


def _lora(**kw):
    return build_peft_strategy({"method": "lora", "r": 4, "alpha": 8, **kw})


def test_lora_at_init_leaves_outputs_unchanged():
    model = _backbone().eval()
    x = torch.randint(0, 50, (2, 10))
    before = model(x)
    _lora().apply(model)
    assert torch.equal(model(x), before)


def test_only_adapter_weights_train_and_change():
    model = _backbone()
    strategy = _lora(target_modules=["q_proj", "v_proj", "down_proj"])
    strategy.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (4, 12))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    counts = strategy.trainable_parameters(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts == parameter_counts(model)


def test_merged_equals_unmerged():
    model = _backbone().eval()
    strategy = _lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"])
    strategy.apply(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randint(0, 50, (3, 9))
    unmerged = model(x)
    merged_model = strategy.merge(model)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged_model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_target_modules_must_exist():
    with pytest.raises(ConfigError) as info:
        _lora(target_modules=["q_proj", "query_key_value"]).apply(_backbone())
    assert info.value.field == "peft.target_modules"
    assert "query_key_value" in str(info.value) and "q_proj" in str(info.value)


def test_unknown_method_and_field():
    with pytest.raises(ConfigError, match="peft.method"):
        build_peft_strategy({"method": "loha-x"})
    with pytest.raises(ConfigError, match="peft.rank"):
        build_peft_strategy({"method": "lora", "rank": 4})


def test_none_and_full_train_everything():
    for method in ("none", "full"):
        model = _backbone()
        model.requires_grad_(False)
        build_peft_strategy({"method": method}).apply(model)
        counts = parameter_counts(model)
        assert counts["trainable"] == counts["total"]


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_merge_exactly_and_train_only_adapters(method):
    model = _backbone().eval()
    x = torch.randint(0, 50, (3, 9))
    before = model(x)
    strategy = build_peft_strategy({"method": method})
    strategy.apply(model)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)  # identity at init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or ("ia3_" in n) for n in trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapted = model(x)
    merged = strategy.merge(model)
    assert not any(("lora_" in n) or ("ia3_" in n) for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


def test_bitfit_trains_biases_and_norms_only_and_frozen_nothing():
    model = _backbone(bias=True)
    build_peft_strategy({"method": "bitfit"}).apply(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("bias") or "norm" in n for n in trainable)
    assert any("norm" in n for n in trainable) and any(n.endswith(".bias") for n in trainable)
    frozen = _backbone()
    build_peft_strategy({"method": "frozen"}).apply(frozen)
    assert parameter_counts(frozen)["trainable"] == 0


def test_bitfit_trains_the_norms_of_a_wrapped_hf_model(tiny_hf_dir):
    # A Llama has no biases, and its LlamaRMSNorm is not an nn.RMSNorm: bitfit trained nothing.
    from lmlab.models import ModelConfig
    from lmlab.models.hf_backbone import HFBackbone

    model = build_peft_strategy({"method": "bitfit"}).apply(
        HFBackbone(ModelConfig(vocab_size=118, hf_path=str(tiny_hf_dir))))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("norm" in n for n in trainable)
