"""Parameter and generation-state accounting against counts taken from built models."""

import pytest

from lmlab.models import DecoderLM, ModelConfig
from lmlab.models.accounting import parameter_report, state_report

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


@pytest.mark.parametrize("router,factor,active_experts", [("topk", None, 2), ("topk", 1.25, 2),
                                                          ("expert_choice", 1.5, 3)])
def test_parameter_report(router, factor, active_experts):
    config = ModelConfig(**TINY, ffn="moe", n_experts=4, top_k=2, router=router,
                         capacity_factor=factor)
    model = DecoderLM(config)
    report = parameter_report(model, config)
    per_expert = sum(p.numel() for p in model.layers[0].ffn.experts[0].parameters())
    assert report["total"] == model.num_parameters() == report["trainable"]
    assert report["active_per_token"] == report["total"] - 2 * (4 - active_experts) * per_expert
    dense_config = ModelConfig(**TINY)
    dense = parameter_report(DecoderLM(dense_config), dense_config)
    assert dense["active_per_token"] == dense["total"]


def test_state_report_matches_the_allocated_cache():
    config = ModelConfig(**{**TINY, "n_layers": 4}, layer_pattern="MMMA", n_kv_heads=2)
    model = DecoderLM(config)
    cache = model.new_cache(1, 10)
    kv = sum(t.numel() * t.element_size() for t in cache.keys + cache.values if t is not None)
    ssm = sum(layer.conv_state.numel() * layer.conv_state.element_size()
              + layer.ssm_state.numel() * layer.ssm_state.element_size()
              for layer in cache.layers if hasattr(layer, "ssm_state"))
    report = state_report(config)
    assert report == {"kv_cache_bytes_per_token": kv // 10, "ssm_state_bytes_per_sequence": ssm}
