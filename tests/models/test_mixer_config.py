"""ConfigErrors for the MoE / Mamba / hybrid / attention-variant fields, and the presets."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.accounting import parameter_report

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def _raises(field: str, **fields) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ModelConfig(vocab_size=10, **fields).validate()
    assert info.value.field == field
    assert field in str(info.value)
    return info.value


def test_top_k_above_n_experts():
    err = _raises("model.top_k", ffn="moe", n_experts=4, top_k=5)
    assert "model.n_experts=4" in str(err) and err.valid == "1, 2, 3, 4"


def test_unknown_pattern_letter_names_the_valid_letters():
    err = _raises("model.layer_pattern", layer_pattern="MMXA")
    assert "A=attention" in err.valid and "M=mamba" in err.valid


def test_pattern_length_must_divide_n_layers():
    _raises("model.layer_pattern", layer_pattern="MMA", n_layers=4)
    ModelConfig(layer_pattern="MA", n_layers=4).validate()
    ModelConfig(layer_pattern="MMMA", n_layers=4).validate()


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_sliding_window_below_one(value):
    _raises("model.sliding_window", sliding_window=value)


def test_unknown_rope_scaling_and_scaling_without_rope():
    _raises("model.rope_scaling", position="rope", rope_scaling="dynamic")
    err = _raises("model.rope_scaling", position="learned", rope_scaling="yarn")
    assert "model.position=learned" in str(err)


@pytest.mark.parametrize("field,fields", [
    ("model.expert_ffn", dict(expert_ffn="moe")),
    ("model.router", dict(router="hash")),
    ("model.n_experts", dict(n_experts=0)),
    ("model.capacity_factor", dict(capacity_factor=0.0)),
    ("model.aux_loss_weight", dict(aux_loss_weight=-1.0)),
    ("model.moe_every", dict(ffn="moe", moe_every=5, n_layers=4)),
    ("model.mixer", dict(mixer="rwkv")),
    ("model.mixer", dict(mixer="mamba", family="encoder")),
    ("model.layer_pattern", dict(layer_pattern="MA", family="encoder_decoder")),
    ("model.ffn", dict(ffn="none", family="encoder")),
    ("model.d_state", dict(d_state=0)),
    ("model.dt_rank", dict(dt_rank=0)),
    ("model.global_tokens", dict(global_tokens=2)),
    ("model.global_tokens", dict(global_tokens=-1, sliding_window=4)),
    ("model.qk_norm", dict(qk_norm="yes")),
    ("model.rope_scaling_factor", dict(position="rope", rope_scaling="linear",
                                       rope_scaling_factor=0.5)),
    ("model.original_max_seq_len", dict(original_max_seq_len=0)),
])
def test_other_invalid_fields(field, fields):
    _raises(field, **fields)


def _preset(name: str) -> ModelConfig:
    """The preset as Hydra composes it: gpt.yaml, then the preset's own fields."""
    node = OmegaConf.merge(OmegaConf.load(CONF / "gpt.yaml"), OmegaConf.load(CONF / f"{name}.yaml"))
    node.pop("defaults", None)
    config = ModelConfig.from_dict(node)
    config.vocab_size = 60
    return config


@pytest.mark.parametrize("name", ["moe", "mamba", "hybrid"])
def test_presets_build_and_run(name):
    config = _preset(name)
    config.d_model = 32  # shrunk for speed; everything else as shipped
    torch.manual_seed(0)
    model = build_backbone(config)
    ids = torch.randint(0, 60, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all()
    report = parameter_report(model, config)
    if name == "moe":
        assert report["active_per_token"] < report["total"]
        assert set(model.auxiliary_losses()) == {"moe/aux_loss", "moe/z_loss"}
    else:
        assert report["active_per_token"] == report["total"]


def test_hybrid_preset_is_jamba_like():
    config = _preset("hybrid")
    assert config.layer_mixers == ["mamba", "mamba", "mamba", "attention"]
    config.ffn, config.n_layers = "moe", 8
    assert [config.is_moe_layer(i) for i in range(8)] == [False, True] * 4
    assert _preset("mamba").layer_mixers == ["mamba"] * 8
