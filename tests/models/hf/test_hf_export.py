"""export_hf: lmlab decoders -> HF directories that transformers loads with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.hf import export_architecture, export_hf, import_hf
from tests.models.hf.conftest import transformers

TOL = 1e-4
VOCAB = 70  # lmlab vocab (padded to 128 inside the backbone)
GQA = dict(n_kv_heads=2, ffn="swiglu", norm="rmsnorm", position="rope", bias=False)


def _random_lmlab(**overrides):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                         **overrides)
    model = build_backbone(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return config, model


def _reload(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()


@pytest.mark.parametrize("arch,overrides", [
    ("LlamaForCausalLM", GQA),
    ("LlamaForCausalLM", {**GQA, "tie_embeddings": False, "n_kv_heads": 1}),
    ("LlamaForCausalLM", {**GQA, "bias": True, "rope_scaling": "linear",
                          "rope_scaling_factor": 2.0, "rope_theta": 500.0}),
    ("GPT2LMHeadModel", {}),
    ("GPT2LMHeadModel", {"ffn": "relu", "tie_embeddings": False, "bias": False}),
])
def test_export_loads_in_transformers_with_same_logits(tmp_path, arch, overrides):
    config, model = _random_lmlab(**overrides)
    assert export_architecture(config) == arch
    export_hf(model, config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    hf = _reload(tmp_path)
    assert hf.config.vocab_size == VOCAB
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[..., :VOCAB]).abs().max() <= TOL
    # ... and back: import(export(model)) is the same model
    config2, state = import_hf(tmp_path)
    again = build_backbone(config2).eval()
    again.load_state_dict(state)
    with torch.no_grad():
        assert (again(ids) - model(ids))[..., :VOCAB].abs().max() <= TOL


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_import_export_round_trip(hf_model, tmp_path, name):
    hf, directory = hf_model(name)
    config, state = import_hf(directory)
    model = build_backbone(config).eval()
    model.load_state_dict(state)
    export_hf(model, config, tmp_path)
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (_reload(tmp_path)(ids).logits - hf(ids).logits).abs().max() <= TOL


def test_export_drops_lmlab_special_rows_with_id_offset(hf_model, tmp_path):
    hf, directory = hf_model("llama")
    config, state = import_hf(directory, id_offset=6)
    model = build_backbone(config).eval()
    model.load_state_dict(state)
    export_hf(model, config, tmp_path, id_offset=6)
    ids = torch.randint(0, 99, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (_reload(tmp_path)(ids).logits - hf(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("overrides,field", [
    ({"position": "alibi"}, "model.position"),
    ({**GQA, "ffn": "gelu"}, "model.ffn"),
    ({**GQA, "norm": "layernorm"}, "model.norm"),
    ({"n_kv_heads": 2}, "model.n_kv_heads"),
    ({"ffn": "moe", "n_experts": 2, "top_k": 1}, "model.ffn"),
    ({"sliding_window": 8}, "model.sliding_window"),
    ({"qk_norm": True}, "model.qk_norm"),
    ({"mixer": "mamba"}, "model.mixer"),
    ({"family": "encoder"}, "model.family"),
])
def test_configs_that_do_not_map_name_the_field(overrides, field):
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, **overrides)
    with pytest.raises(ConfigError) as err:
        export_architecture(config)
    assert err.value.field == field


def test_unmerged_adapters_are_refused(tmp_path):
    from lmlab.peft import build_peft_strategy

    config, model = _random_lmlab(**GQA)
    model = build_peft_strategy({"method": "lora", "r": 2}).apply(model)
    with pytest.raises(ValueError, match="merge"):
        export_hf(model, config, tmp_path)
