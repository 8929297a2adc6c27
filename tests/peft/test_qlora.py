"""QLoRA on CPU: bitsandbytes 4-bit base + peft LoRA, checked against dequantize-then-matmul."""

from __future__ import annotations

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit

from lmlab import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.peft import build_peft_strategy, parameter_counts

VOCAB = 50


def _backbone(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn="swiglu",
               norm="rmsnorm", position="rope", bias=False)
    cfg.update(kw)
    return build_backbone(ModelConfig(**cfg))


def _qlora(**kw):
    return build_peft_strategy({"method": "qlora", "r": 4, "alpha": 8, **kw})


def _randomize_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


def _call(model, x, family="decoder"):
    return model(x, None, x) if family == "encoder_decoder" else model(x)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_forward_matches_dequantize_then_matmul(quant_type, double_quant):
    model = _backbone(bias=True, ffn="gelu")
    strategy = _qlora(quant_type=quant_type, double_quant=double_quant, target_modules=["q_proj", "up_proj"])
    strategy.apply(model)
    _randomize_lora(model)
    layer = model.layers[1].ffn.up_proj  # peft's 4-bit LoRA layer around a Linear4bit
    base = layer.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    assert base.weight.quant_type == quant_type
    weight = dequantize_4bit(base.weight.data, base.weight.quant_state)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 7, 64)
    reference = F.linear(x, weight, base.bias) + (x @ a.T @ b.T) * (8 / 4)
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
    # A layer without LoRA is the quantized base alone.
    o_proj = model.layers[0].attn.o_proj
    assert isinstance(o_proj, bnb.nn.Linear4bit)
    torch.testing.assert_close(
        o_proj(x), F.linear(x, dequantize_4bit(o_proj.weight.data, o_proj.weight.quant_state), o_proj.bias),
        atol=1e-5, rtol=1e-5)


def test_quantization_error_is_small_and_weights_shrink():
    model = _backbone().eval()
    x = torch.randint(0, VOCAB, (2, 10))
    before = model(x)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}
    strategy = _qlora()
    strategy.apply(model)
    report = strategy.report()
    assert report["quantized_layers"] == len(originals) == 14  # 7 Linears x 2 layers
    # 4 bits + block statistics vs 32 bits (~1/8 for large layers; these tiny ones pay ~1.3 KB
    # of per-layer quantization tables).
    assert report["quantized_linear_bytes_after"] < report["quantized_linear_bytes_before"] / 5
    assert report["frozen_base_bytes_after"] < report["frozen_base_bytes_before"]
    # Embeddings and lm_head (tied) stay in full precision.
    assert model.embed_tokens.weight.dtype == torch.float32
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    after = model(x)  # LoRA is zero at init: only the quantization error is left
    assert not torch.equal(after, before)
    assert (after - before).abs().max() < 0.1 * before.abs().max()
    counts = parameter_counts(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts["trainable"] == lora
    assert counts["total"] == sum(v.numel() for v in originals.values()) + lora + sum(
        p.numel() for n, p in model.named_parameters() if p.dtype != torch.uint8 and "lora_" not in n)


def test_frozen_4bit_weights_stay_bit_identical_and_loss_goes_down():
    model = _backbone()
    _qlora().apply(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    assert any(v.dtype == torch.uint8 for v in frozen.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = torch.randint(0, VOCAB, (8, 12))
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_state_dict_reloads_into_a_fresh_model_exactly():
    """Resuming, init_from and export load the packed weights and their statistics back."""
    model = _backbone(seed=0).eval()
    strategy = _qlora()
    strategy.apply(model)
    _randomize_lora(model)
    x = torch.randint(0, VOCAB, (2, 9))
    expected = model(x)
    fresh = _backbone(seed=1).eval()  # other random weights, other quantization statistics
    _qlora().apply(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), expected)


def test_merge_dequantizes_into_a_plain_model_equal_to_the_unmerged_one():
    model = _backbone().eval()
    strategy = _qlora()
    strategy.apply(model)
    _randomize_lora(model)
    x = torch.randint(0, VOCAB, (3, 9))
    unmerged = model(x)
    merged = strategy.merge(model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)
    plain = _backbone()  # the merged state is an ordinary backbone's state
    plain.load_state_dict(merged.state_dict(), strict=True)


@pytest.mark.parametrize("family_kw", [
    dict(mixer="mamba", ffn="none", position="none"),
    dict(ffn="moe", n_experts=4, top_k=2, position="learned", norm="layernorm"),
    dict(family="encoder", norm_position="post", mlm_head=True, position="learned", norm="layernorm", bias=True),
    dict(family="encoder_decoder", position="relative"),
], ids=["mamba", "moe", "bert", "t5"])
def test_every_family_quantizes_its_blocks_only(family_kw):
    model = _backbone(**family_kw).eval()
    family = family_kw.get("family", "decoder")
    x = torch.randint(6, VOCAB, (2, 8))
    before = _call(model, x, family)
    strategy = _qlora()
    strategy.apply(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".layers." in f".{n}" for n in quantized)
    assert not any(n.endswith("router") for n in quantized)
    after = _call(model, x, family)
    assert torch.isfinite(after).all() and after.shape == before.shape
    assert (after - before).abs().max() < 0.2 * before.abs().max()


def test_invalid_fields_and_targets():
    with pytest.raises(ConfigError, match="peft.quant_type"):
        _qlora(quant_type="int4")
    with pytest.raises(ConfigError, match="peft.compute_dtype"):
        _qlora(compute_dtype="float8")
    with pytest.raises(ConfigError) as info:
        _qlora(target_modules=["lm_head"]).apply(_backbone())
    assert info.value.field == "peft.target_modules" and "full precision" in str(info.value)
    with pytest.raises(ConfigError, match="peft.target_modules"):
        _qlora(target_modules=["attn"]).apply(_backbone())  # a module, not a Linear


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "adapter"])
def test_model_hf_is_refused_before_compute(method, make_cfg, tiny_hf_dir):
    from lmlab.assemble import build_parts

    cfg = make_cfg(["model=hf", f"model.hf_path={tiny_hf_dir}", "tokenizer=hf",
                    f"tokenizer.path={tiny_hf_dir}", f"peft={method}"])
    with pytest.raises(ConfigError) as info:
        build_parts(cfg)
    assert info.value.field == "peft" and "model=hf" in str(info.value) and method in str(info.value)


def test_lmlab_imports_without_bitsandbytes_until_a_run_quantizes():
    # A machine without bitsandbytes (the lent GPU machines' image) still runs everything but
    # qlora: lmlab imports it when a QLoRA run quantizes, not with `lmlab.peft`.
    code = (
        "import sys\n"
        "sys.modules['bitsandbytes'] = None  # import bitsandbytes -> ImportError\n"
        "import lmlab.train\n"
        "from lmlab.peft import build_peft_strategy\n"
        "strategy = build_peft_strategy({'method': 'qlora'})\n"
        "try:\n"
        "    strategy.apply(__import__('torch').nn.Module())\n"
        "except ImportError as error:\n"
        "    print('apply needs it:', error)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "apply needs it:" in proc.stdout and "bitsandbytes" in proc.stdout
