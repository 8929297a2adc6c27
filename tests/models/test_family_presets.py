"""conf/model/{bert,transformer,t5}.yaml compose into valid ModelConfigs of the right shape."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lmlab.models import EncoderDecoderModel, EncoderModel, ModelConfig, build_backbone

MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def _preset(name: str) -> ModelConfig:
    with initialize_config_dir(config_dir=str(MODEL_DIR), version_base="1.3"):
        return ModelConfig.from_dict(compose(name))


def test_gpt_lists_every_field_with_its_default():
    assert _preset("gpt") == ModelConfig()


@pytest.mark.parametrize("name,cls,expected", [
    ("bert", EncoderModel, dict(family="encoder", position="learned", ffn="gelu",
                                norm="layernorm", norm_position="post", d_model=128,
                                n_layers=4, n_heads=4, max_seq_len=128)),
    ("transformer", EncoderDecoderModel, dict(
        family="encoder_decoder", n_layers=4, n_decoder_layers=4, n_heads=4, d_model=128,
        d_ff=512, max_seq_len=64, position="sinusoidal", norm_position="post", ffn="relu",
        tie_embeddings=True, scale_embeddings=True, dropout=0.1)),
    ("t5", EncoderDecoderModel, dict(
        family="encoder_decoder", norm="rmsnorm", norm_position="pre", position="relative",
        ffn="swiglu", bias=False, d_model=128, n_layers=4, n_decoder_layers=4)),
])
def test_preset(name, cls, expected):
    config = _preset(name)
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    config.vocab_size = 100
    model = build_backbone(config).eval()
    assert isinstance(model, cls)
    ids = torch.randint(0, 100, (2, 7))
    out = model(ids, torch.ones(2, 7)) if cls is EncoderModel else model(ids, None, ids[:, :5])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["bert", "transformer", "t5"])
def test_preset_file_is_documented(name):
    lines = (MODEL_DIR / f"{name}.yaml").read_text().splitlines()
    assert lines[0].startswith("# ")
    assert lines[1:4] == ["defaults:", "  - gpt", "  - _self_"]
    fields = [line for line in lines[4:] if line.strip()]
    assert fields and all(" # " in line for line in fields)
