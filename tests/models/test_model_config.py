import pytest
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.config import FAMILIES


def _raises(field: str, **fields) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ModelConfig(vocab_size=10, **fields).validate()
    assert info.value.field == field
    assert field in str(info.value)
    return info.value


def test_default_config_is_valid():
    ModelConfig().validate()
    assert set(FAMILIES) >= {"decoder", "encoder", "encoder_decoder"}


def test_n_heads_must_divide_d_model_and_lists_divisors():
    err = _raises("model.n_heads", d_model=128, n_heads=6)
    assert "model.d_model=128" in str(err)
    assert "8" in err.valid and "16" in err.valid


def test_n_kv_heads_must_divide_n_heads_and_lists_valid_values():
    err = _raises("model.n_kv_heads", n_heads=8, d_model=64, n_kv_heads=3)
    assert err.valid == "1, 2, 4, 8"


@pytest.mark.parametrize("field", ["position", "norm", "ffn", "attn_impl", "family", "compile_mode"])
def test_unknown_choice(field):
    _raises(f"model.{field}", **{field: "bogus"})


def test_compile_mode_lists_torch_compiles_modes():
    err = _raises("model.compile_mode", compile_mode="fast")
    assert "fast" in str(err)
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert mode in str(err)
        ModelConfig(compile=True, compile_mode=mode).validate()


@pytest.mark.parametrize("field,value", [("d_model", 0), ("n_layers", -1), ("n_heads", 2.0),
                                         ("max_seq_len", True), ("d_ff", 0), ("n_kv_heads", 0),
                                         ("pad_vocab_multiple", 0)])
def test_positive_ints(field, value):
    _raises(f"model.{field}", **{field: value})


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_dropout_range(value):
    _raises("model.dropout", dropout=value)


def test_rope_needs_even_head_dim():
    err = _raises("model.n_heads", position="rope", d_model=36, n_heads=4)  # head_dim 9
    assert "even" in str(err)
    ModelConfig(position="alibi", d_model=36, n_heads=4).validate()  # only rope cares


def test_unknown_key_names_the_field_and_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"d_model": 64, "foo": 1})
    assert info.value.field == "model.foo"
    assert "d_model" in info.value.valid and "n_kv_heads" in info.value.valid


def test_from_dict_accepts_omegaconf_and_round_trips():
    node = OmegaConf.create({"d_model": 64, "n_heads": 8, "n_kv_heads": 2, "position": "rope"})
    cfg = ModelConfig.from_dict(node)
    assert cfg.kv_heads == 2 and cfg.head_dim == 8
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_resolved_sizes():
    assert ModelConfig(d_model=64).ffn_dim == 256
    assert ModelConfig(d_model=64, ffn="swiglu").ffn_dim == 192  # int(170.67) -> 192
    assert ModelConfig(d_model=96, ffn="swiglu").ffn_dim == 256
    assert ModelConfig(d_model=64, d_ff=100, ffn="swiglu").ffn_dim == 100
    assert ModelConfig(n_heads=4).kv_heads == 4
    assert ModelConfig(vocab_size=100).padded_vocab_size == 128
    assert ModelConfig(vocab_size=128).padded_vocab_size == 128


def test_build_needs_vocab_size():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_backbone(ModelConfig(d_model=32, n_heads=4))


def test_runtime_fields_change_no_parameter():
    """RUNTIME_FIELDS is what resume, init_from and peft_from let differ from the saved model:
    each must be a real field, and changing it must leave every parameter's name and shape."""
    from lmlab.models.config import RUNTIME_FIELDS

    other = {"dropout": 0.3, "attn_impl": "eager", "activation_checkpointing": True,
             "compile": True, "compile_mode": "max-autotune"}
    assert set(other) == set(RUNTIME_FIELDS)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    shapes = {k: v.shape for k, v in build_backbone(ModelConfig(**base)).state_dict().items()}
    for field, value in other.items():
        config = ModelConfig(**base, **{field: value})
        config.validate()
        changed = {k: v.shape for k, v in build_backbone(config).state_dict().items()}
        assert changed == shapes, field
