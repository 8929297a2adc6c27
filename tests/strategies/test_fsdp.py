"""FSDP2 wrapping: which modules are sharded on their own, for every family."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.strategies.fsdp import FORWARD_METHODS, FSDP2Strategy, transformer_blocks

PRESETS = {
    "gpt": {"family": "decoder"},
    "moe": {"family": "decoder", "ffn": "moe", "n_experts": 4, "top_k": 2},
    "mamba": {"family": "decoder", "mixer": "mamba", "ffn": "none", "position": "none"},
    "bert": {"family": "encoder", "norm_position": "post"},
    "transformer": {"family": "encoder_decoder", "n_decoder_layers": 3},
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_block_is_found_once(name):
    config = ModelConfig.from_dict({"vocab_size": 64, "d_model": 32, "n_heads": 4, "n_layers": 2,
                                    "max_seq_len": 32, **PRESETS[name]})
    with torch.device("meta"):
        backbone = build_backbone(config)
    blocks = transformer_blocks(backbone)
    expected = 2 + (3 if name == "transformer" else 0)
    assert len(blocks) == expected and len({id(b) for b in blocks}) == expected
    # blocks hold most weights; experts stay inside their block
    inside = sum(p.numel() for b in blocks for p in b.parameters())
    assert inside > 0.3 * sum(p.numel() for p in backbone.parameters())


@pytest.mark.parametrize("name,methods", [("gpt", {"hidden"}), ("bert", {"mlm_logits"}),
                                          ("transformer", {"encode", "decode"})])
def test_backbone_methods_tasks_call_are_registered(name, methods):
    """FSDP2 gathers weights only around registered calls: each method a task calls besides
    forward must be in FORWARD_METHODS."""
    config = ModelConfig.from_dict({"vocab_size": 64, "d_model": 32, "n_heads": 4, "n_layers": 2,
                                    "max_seq_len": 32, **PRESETS[name]})
    with torch.device("meta"):
        backbone = build_backbone(config)
    assert methods <= {m for m in FORWARD_METHODS if callable(getattr(backbone, m, None))}


def test_bad_mixed_precision_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.strategy.param_dtype"):
        FSDP2Strategy(param_dtype="float8")
