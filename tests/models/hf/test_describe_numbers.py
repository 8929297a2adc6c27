"""describe(): parameters by hand, FLOPs against FlopCounterMode, cache bytes by formula."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmlab.describe import describe, format_description
from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.hf import import_hf
from lmlab.models.hf_backbone import HFBackbone
from lmlab.peft import build_peft_strategy

B, T = 2, 32
TINY = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=T,
            attn_impl="eager")  # eager: FlopCounterMode does not see SDPA's CPU kernel


def _measured(config: ModelConfig) -> tuple[float, float]:
    """FlopCounterMode's forward and forward+backward FLOPs per token."""
    torch.manual_seed(0)
    model = build_backbone(config)
    ids = torch.randint(0, config.vocab_size, (B, T))

    def run():
        if config.family == "encoder_decoder":
            return model(ids, None, ids)
        if config.family == "encoder":
            return model.mlm_logits(model(ids))
        return model(ids)

    tokens = B * T * (2 if config.family == "encoder_decoder" else 1)
    with FlopCounterMode(display=False) as forward:
        run()
    with FlopCounterMode(display=False) as both:
        run().float().square().mean().backward()
    return forward.get_total_flops() / tokens, both.get_total_flops() / tokens


@pytest.mark.parametrize("overrides", [
    {},
    dict(n_kv_heads=2, ffn="swiglu", norm="rmsnorm", position="rope", bias=False),
    dict(ffn="moe", n_experts=4, top_k=2),
    dict(family="encoder", norm_position="post"),
    dict(family="encoder_decoder", position="relative", n_decoder_layers=3),
], ids=["gpt", "gqa", "moe", "bert", "t5"])
def test_flops_match_flop_counter(overrides):
    config = ModelConfig(**TINY, **overrides)
    flops = describe(config, seq_len=T)["flops_per_token"]
    forward, both = _measured(config)
    assert flops["forward"] == pytest.approx(forward, rel=0.02)
    assert flops["forward_backward"] == pytest.approx(both, rel=0.02)
    assert flops["forward_backward"] == 3 * flops["forward"]


def test_parameters_by_hand():
    d, f, L, V, P = 64, 256, 2, 128, T  # gpt: MHA, GELU MLP, LayerNorm, tied, learned positions
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 2 * 2 * d
    total = V * d + P * d + L * per_layer + 2 * d
    p = describe(ModelConfig(**TINY))["parameters"]
    assert p["total"] == p["trainable"] == p["active_per_token"] == total
    assert p["embedding"] == V * d + P * d
    assert p["matmul_per_token"] == L * (4 * d * d + 2 * d * f) + d * V


def test_moe_active_parameters():
    config = ModelConfig(**TINY, ffn="moe", n_experts=8, top_k=2)
    p = describe(config)["parameters"]
    expert = 2 * 64 * 256 + 256 + 64
    assert p["total"] - p["active_per_token"] == 2 * (8 - 2) * expert


def test_lora_lowers_backward_flops_and_trainable_count():
    config = ModelConfig(**TINY)
    full = describe(config)
    model = build_peft_strategy({"method": "lora", "r": 2}).apply(build_backbone(config))
    lora = describe(config, backbone=model)
    assert lora["parameters"]["trainable"] < full["parameters"]["trainable"]
    assert lora["flops_per_token"]["forward_backward"] < full["flops_per_token"]["forward_backward"]


def test_kv_cache_bytes_gqa_window_and_ssm():
    mha = describe(ModelConfig(**TINY))["kv_cache"]
    assert mha["bytes_per_token"] == {"16bit": 2 * 2 * 64 * 2, "fp32": 2 * 2 * 64 * 4}
    assert mha["bytes_at_seq_len"]["16bit"] == T * mha["bytes_per_token"]["16bit"]
    gqa = describe(ModelConfig(**TINY, n_kv_heads=1))["kv_cache"]
    assert gqa["bytes_per_token"]["fp32"] * 4 == mha["bytes_per_token"]["fp32"]
    window = describe(ModelConfig(**TINY, sliding_window=8))
    assert window["kv_cache"]["bytes_at_seq_len"]["16bit"] == 8 * mha["bytes_per_token"]["16bit"]
    # The window is a mask over the T keys: their scores are computed, as under causal masking.
    assert window["flops_per_token"]["attention"] == 2 * 4 * 64 * T
    assert describe(ModelConfig(**TINY, family="encoder"))["kv_cache"] is None
    hybrid = describe(ModelConfig(**TINY, layer_pattern="MA"))
    assert hybrid["kv_cache"]["attention_layers"] == 1
    d_inner = 2 * 64
    state = d_inner * 3 * 2 + d_inner * 16 * 4  # conv inputs (16-bit) + SSM state (fp32)
    assert hybrid["ssm_state"]["bytes_per_sequence"]["16bit"] == state
    assert hybrid["flops_per_token"]["ssm_scan"] == (9 * 16 + 2) * d_inner
    assert [r["mixer"] for r in hybrid["layers"]] == ["mamba", "attention"]


def test_layer_plan_report_and_json():
    config = ModelConfig(**{**TINY, "n_layers": 4}, ffn="moe", moe_every=2, expert_ffn="swiglu",
                         family="encoder_decoder", position="relative", n_decoder_layers=2)
    d = describe(config)
    assert [(r["stack"], r["ffn"].split()[0]) for r in d["layers"]] == [
        ("encoder", "swiglu"), ("encoder", "moe"), ("encoder", "swiglu"), ("encoder", "moe"),
        ("decoder", "swiglu"), ("decoder", "moe")]
    assert d["layers"][4]["attention"] == "causal + cross"
    text = format_description(d)
    for needle in ("parameters", "forward_backward", "KV cache", "cross-attn", "decoder  1"):
        assert needle in text
    json.dumps(d)


def test_vocab_size_is_needed():
    with pytest.raises(ConfigError):
        describe(ModelConfig(vocab_size=0))
    assert describe(ModelConfig(vocab_size=0), vocab_size=50)["vocab_size"] == 50


def test_hf_models(hf_model):
    _, llama = hf_model("llama")
    d = describe(_with_path(llama))
    assert d["hf_architecture"] == "LlamaForCausalLM"
    assert d["kv_cache"]["bytes_per_token"]["fp32"] == 2 * 2 * 8 * 2 * 4  # K+V, 2 kv heads of 8
    assert d["flops_per_token"] == describe(import_hf(llama)[0])["flops_per_token"]
    neox, neox_dir = hf_model("neox")
    d = describe(_with_path(neox_dir))
    assert d["parameters"]["total"] == sum(p.numel() for p in neox.parameters())
    assert d["flops_per_token"]["forward"] > 2 * d["parameters"]["matmul_per_token"]
    backbone = HFBackbone(_with_path(neox_dir))
    assert describe(_with_path(neox_dir), backbone=backbone)["parameters"]["total"] == \
        d["parameters"]["total"]


def _with_path(directory) -> ModelConfig:
    """A ModelConfig naming an HF dir, before and after the lead adds `hf_path` to it."""
    if "hf_path" in ModelConfig.__dataclass_fields__:
        return ModelConfig(hf_path=str(directory))
    config = ModelConfig()
    config.hf_path = str(directory)
    return config


def test_model_hf_describe_counts_the_backward_as_the_wrapped_model_trains(tiny_hf_dir):
    # A converted architecture is described as its lmlab equivalent, fully trained; with a
    # LoRA-adapted backbone its forward_backward was 26 % over what the run computes.
    from lmlab.flops import TrainingFlops
    from lmlab.peft.lora import LoRA

    config = ModelConfig(vocab_size=118, hf_path=str(tiny_hf_dir))
    for peft in (None, LoRA(target_modules=["q_proj", "v_proj"])):
        backbone = HFBackbone(config)
        backbone = peft.apply(backbone) if peft else backbone
        per_token = describe(config, backbone=backbone, seq_len=32)["flops_per_token"]
        assert per_token["forward_backward"] == pytest.approx(
            TrainingFlops(config, backbone).batch(1, 32) / 32)
