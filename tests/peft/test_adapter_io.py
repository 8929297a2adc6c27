"""Adapter-only files for every PEFT method: export the trained tensors, load them onto the base,
get the same outputs; the files are small and refuse a base they were not trained on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmlab import ConfigError
from lmlab.export import export_adapter, export_checkpoint
from lmlab.models import ModelConfig, build_backbone
from lmlab.peft import STRATEGIES, build_peft_strategy
from lmlab.peft.adapter_io import read_adapter, trainable_keys
from lmlab.tokenizers import TokenizerConfig, build_tokenizer

MODEL = dict(vocab_size=50, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn="swiglu", norm="rmsnorm",
             position="rope", bias=False, max_seq_len=32)
# Small settings, as a real adapter is small next to its base.
SETTINGS = {"lora": {"r": 2}, "dora": {"r": 2}, "qlora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "adapter": {"bottleneck": 4}, "prefix": {"n_virtual_tokens": 2},
            "prompt": {"n_virtual_tokens": 2, "init": "random"}}
METHODS = sorted(STRATEGIES)


class Task(nn.Module):
    """What a Lightning task contributes to a checkpoint: `backbone.*`, a head, a counter."""

    def __init__(self, backbone: nn.Module, head_seed: int):
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(head_seed)
        self.head = nn.Linear(MODEL["d_model"], 3)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.backbone(x), self.head(self.backbone.hidden(x))


def _task(method: str, base_seed: int = 0, head_seed: int = 1, peft: dict | None = None):
    torch.manual_seed(base_seed)
    backbone = build_backbone(ModelConfig(**MODEL))
    strategy = build_peft_strategy(peft or {"method": method, **SETTINGS.get(method, {})})
    strategy.apply(backbone)
    if method == "frozen":
        backbone.requires_grad_(False)
    return Task(backbone, head_seed).eval(), strategy


def _checkpoint(tmp_path, task, strategy) -> str:
    """A checkpoint as a run leaves it, after "training" moved every trainable tensor."""
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), ["0123456789 abc"])
    tokenizer.save(tmp_path / "tok")
    files = {p.name: p.read_text() for p in (tmp_path / "tok").iterdir()}
    task.tokens_seen += 1000
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": task.state_dict(), "lmlab": {
        "model": ModelConfig(**MODEL).to_dict(), "peft": strategy.to_dict(), "tokenizer_files": files,
        "trainable": trainable_keys(task)}}, path)
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_save_then_load_reproduces_outputs(method, tmp_path):
    trained, strategy = _task(method)
    ckpt = _checkpoint(tmp_path, trained, strategy)
    x = torch.randint(6, 50, (2, 9))
    expected = trained(x)

    path = export_adapter(ckpt, tmp_path / "adapter")
    source = read_adapter(tmp_path / "adapter")
    assert source.peft == strategy.to_dict()
    fresh, _ = _task(method, head_seed=7, peft=source.peft_config({"method": "none"}))
    assert not torch.equal(fresh(x)[1], expected[1])  # another head until the tensors are loaded
    source.load_into(fresh)
    for got, want in zip(fresh(x), expected):
        assert torch.equal(got, want)

    stored = set(source.tensors) | set(source.config["aliases"])
    assert stored == set(trainable_keys(trained))
    assert "tokens_seen" not in stored
    size, full = path.stat().st_size, (tmp_path / "last.ckpt").stat().st_size
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["bytes"] == size and config["checkpoint_bytes"] == full
    if method not in ("none", "full"):
        assert size < full / 4, (size, full)


@pytest.mark.parametrize("method", ["lora", "qlora", "adapter"])
def test_an_adapter_refuses_another_base_and_another_method(method, tmp_path):
    trained, strategy = _task(method)
    export_adapter(_checkpoint(tmp_path, trained, strategy), tmp_path / "adapter")
    source = read_adapter(tmp_path / "adapter" / "adapter.safetensors")  # the file works too
    other, _ = _task(method, base_seed=3, peft=source.peft)
    with pytest.raises(ConfigError) as info:
        source.load_into(other)
    assert info.value.field == "peft_from" and "base differs" in str(info.value)
    with pytest.raises(ConfigError) as info:
        source.peft_config({"method": "ia3"})
    assert info.value.field == "peft" and method in str(info.value)
    with pytest.raises(ConfigError) as info:
        source.check_model({**ModelConfig(**MODEL).to_dict(), "d_model": 128})
    assert info.value.field == "model.d_model"


def test_missing_or_unreadable_adapter_files(tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json|adapter.safetensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="peft_from"):
        read_adapter(tmp_path)


def test_merged_export_of_a_method_that_cannot_merge_says_so(tmp_path):
    trained, strategy = _task("adapter")
    ckpt = _checkpoint(tmp_path, trained, strategy)
    with pytest.raises(ConfigError) as info:
        export_checkpoint(ckpt, tmp_path / "merged")
    assert "--adapter-only" in str(info.value) and "peft='adapter'" not in str(info.value)
    assert "cannot be merged" in str(info.value)


def test_qlora_merged_export_is_a_plain_dequantized_backbone(tmp_path):
    trained, strategy = _task("qlora")
    ckpt = _checkpoint(tmp_path, trained, strategy)
    x = torch.randint(6, 50, (2, 9))
    expected = trained.backbone(x)
    export_checkpoint(ckpt, tmp_path / "merged")
    exported = torch.load(tmp_path / "merged" / "model.ckpt", weights_only=True)
    assert exported["lmlab"]["merged_from"]["method"] == "qlora"
    plain = build_backbone(ModelConfig(**MODEL)).eval()
    plain.load_state_dict({k[len("backbone."):]: v for k, v in exported["state_dict"].items()}, strict=True)
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_checkpoints_without_a_trainable_list_are_exported_from_the_rebuilt_method(tmp_path):
    """Checkpoints written before lmlab recorded what trained: the method is re-applied to ask."""
    trained, strategy = _task("lora")
    ckpt = _checkpoint(tmp_path, trained, strategy)
    payload = torch.load(ckpt, weights_only=True)
    del payload["lmlab"]["trainable"]
    torch.save(payload, ckpt)
    export_adapter(ckpt, tmp_path / "adapter")
    source = read_adapter(tmp_path / "adapter")
    assert set(source.tensors) == set(trainable_keys(trained))
    fresh, _ = _task("lora", head_seed=7, peft=source.peft)
    source.load_into(fresh)
    x = torch.randint(6, 50, (2, 9))
    for got, want in zip(fresh(x), trained(x)):
        assert torch.equal(got, want)
