"""Structured pruning: the shrunk model computes exactly what the model with the pruned heads
and neurons zeroed computes (full forward and KV-cache generation), in every family."""

from __future__ import annotations

import copy

import pytest
import torch

from lmlab import ConfigError
from lmlab.compress import Pruning
from lmlab.compress.measure import parameter_count
from lmlab.compress.structured import (
    count_heads_and_neurons,
    head_scores,
    mask_structured,
    plan_structured,
    self_attentions,
    shrink,
)
from lmlab.models.generation import generate
from lmlab.models.seq2seq_generation import generate_seq2seq
from tests.compress.conftest import tiny

VARIANTS = {
    "mha_gelu": {},
    "gqa_swiglu_rope": {"n_kv_heads": 2, "ffn": "swiglu", "position": "rope", "bias": False, "norm": "rmsnorm"},
    "mqa": {"n_kv_heads": 1},
    "moe": {"ffn": "moe", "n_experts": 2, "top_k": 1},
}


def _pair(heads: int, ffn_sparsity: float, **config):
    """(masked reference, shrunk) copies of one trained-looking backbone, and the plan."""
    backbone = tiny(**config)
    plan = plan_structured(backbone, heads, ffn_sparsity)
    return mask_structured(copy.deepcopy(backbone), plan), shrink(copy.deepcopy(backbone), plan), plan


@pytest.mark.parametrize("variant", VARIANTS)
def test_shrunk_decoder_equals_masked_decoder(variant):
    config = VARIANTS[variant]
    heads = 2 if config.get("n_kv_heads") == 2 else 1
    masked, shrunk, _ = _pair(heads, 0.5, **config)
    x = torch.randint(6, 50, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), rtol=1e-5, atol=1e-5)
    assert parameter_count(shrunk) < parameter_count(masked)
    counts = count_heads_and_neurons(shrunk)
    assert counts["attention_heads"] == 2 * (4 - heads)


def test_shrunk_decoder_generates_like_the_masked_one_with_the_kv_cache():
    masked, shrunk, _ = _pair(2, 0.25)  # MHA: key/value heads go too, the cache shrinks per layer
    prompt = torch.randint(6, 50, (2, 5))
    cached = generate(shrunk, prompt, max_new_tokens=6, use_cache=True)
    assert torch.equal(cached, generate(shrunk, prompt, max_new_tokens=6, use_cache=False))
    assert torch.equal(cached, generate(masked, prompt, max_new_tokens=6, use_cache=True))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_shrunk_encoder_decoder_equals_masked(norm_position):
    masked, shrunk, plan = _pair(1, 0.5, family="encoder_decoder", norm_position=norm_position)
    assert any(name.startswith("encoder.") for name in plan.heads)
    assert any(name.startswith("decoder.") for name in plan.heads)
    assert not any("cross_attn" in name for name in plan.heads)
    src, tgt = torch.randint(6, 50, (2, 9)), torch.randint(6, 50, (2, 7))
    src_mask = torch.ones_like(src)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(src, src_mask, tgt), masked(src, src_mask, tgt), rtol=1e-5, atol=1e-5)
    out = generate_seq2seq(shrunk, src, src_mask, max_new_tokens=5, bos_id=1, eos_id=None)
    assert torch.equal(out, generate_seq2seq(masked, src, src_mask, max_new_tokens=5, bos_id=1, eos_id=None))


def test_encoder_shrinks_too():
    masked, shrunk, _ = _pair(1, 0.5, family="encoder", norm_position="post", position="learned", mlm_head=True)
    x = torch.randint(6, 50, (2, 10))
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x, mask), masked(x, mask), rtol=1e-5, atol=1e-5)


def test_the_weakest_heads_go_and_gqa_groups_stay_even():
    backbone = tiny(n_kv_heads=2, n_heads=4)
    attn = next(iter(self_attentions(backbone).values()))
    with torch.no_grad():
        attn.q_proj.weight[0:8] *= 0.01   # head 0 (group 0) is made the weakest
        attn.q_proj.weight[24:32] *= 0.01  # head 3 (group 1)
    scores = head_scores(attn)
    # an independent reading of the criterion: the L2 norm of the head's q rows and o columns
    reference = torch.stack([torch.cat([attn.q_proj.weight[8 * h:8 * h + 8].flatten(),
                                        attn.o_proj.weight[:, 8 * h:8 * h + 8].flatten()]).norm()
                             for h in range(4)])
    torch.testing.assert_close(scores, reference.detach())
    plan = plan_structured(backbone, heads=2, ffn_sparsity=0.0)
    assert next(iter(plan.heads.values())) == [1, 2]  # one per group, the stronger one


def test_impossible_head_counts_are_config_errors():
    with pytest.raises(ConfigError, match="at least one must stay"):
        Pruning(kind="structured", heads=4).check(tiny(), None)
    with pytest.raises(ConfigError, match="multiple of 2"):
        Pruning(kind="structured", heads=1).check(tiny(n_kv_heads=2), None)
    with pytest.raises(ConfigError) as info:
        Pruning(kind="structured", heads=0, ffn_sparsity=0.0)
    assert info.value.field == "compress.heads"
    with pytest.raises(ConfigError) as info:
        Pruning(kind="structured", heads=1).check(tiny(mixer="mamba", ffn="none", position="none"), None)
    assert info.value.field == "compress.heads"


@pytest.mark.slow
def test_structured_run_records_smaller_model(make_cfg):
    from lmlab.train import run

    record = run(make_cfg(["compress=prune", "compress.kind=structured", "compress.heads=2",
                           "compress.ffn_sparsity=0.25", "compress.finetune_steps=2"]))
    section = record["compress"]
    assert section["attention_heads_after"] == section["attention_heads_before"] // 2
    assert section["params_after"] < section["params_before"]
    assert section["size_bytes_after"] < section["size_bytes_before"]
    assert section["metrics_after_finetune"]["val/loss"] > 0
