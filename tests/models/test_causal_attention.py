"""The CPU causal block attention against SDPA in float64: values and every gradient, for
MHA, GQA and MQA, at lengths on and off the block size; when it is used, and a decoder step
through it against the same step on SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import ModelConfig, build_backbone
from lmlab.models.layers import causal_attention
from lmlab.models.layers.causal_attention import applies, causal_block_attention


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T", [128, 200, 256, 1000])
def test_values_and_gradients_match_sdpa(heads, kv_heads, T):
    torch.manual_seed(0)
    B, D = 2, 16
    q = torch.randn(B, heads, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, T, D, dtype=torch.float64, requires_grad=True)
    # Non-contiguous q, as the model's head views are.
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    d_out = torch.randn(B, heads, T, D, dtype=torch.float64)
    ours = causal_block_attention(q_view, k, v)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=kv_heads != heads)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), d_out),
                    torch.autograd.grad(reference, (q, k, v), d_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_used_only_for_full_precision_causal_cpu_training_at_its_lengths():
    q = torch.zeros(1, 4, 256, 8, requires_grad=True)
    k = torch.zeros(1, 2, 256, 8, requires_grad=True)
    assert applies(q, k, True, None, 0.0)
    assert not applies(q, k, False, None, 0.0)                      # not causal
    assert not applies(q, k, True, torch.ones(256, 256, dtype=torch.bool), 0.0)  # a mask
    assert not applies(q, k, True, None, 0.1)                       # dropout
    assert not applies(q[..., :64, :], k[..., :64, :], True, None, 0.0)  # one block: no skip
    assert applies(*[torch.zeros(1, 4, 1024, 8, requires_grad=True)] * 2, True, None, 0.0)
    long = torch.zeros(1, 4, 2048, 8, requires_grad=True)
    assert not applies(long, long, True, None, 0.0)                 # probabilities too large
    assert not applies(q.detach().bfloat16(), k.detach().bfloat16(), True, None, 0.0)
    with torch.no_grad():
        assert not applies(q, k, True, None, 0.0)                   # inference keeps SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not applies(q, k, True, None, 0.0)                   # bf16 keeps SDPA


def test_decoder_step_equals_the_sdpa_step(monkeypatch):
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn="swiglu", norm="rmsnorm", position="rope", bias=False,
                         max_seq_len=256)
    torch.manual_seed(0)
    model = build_backbone(config).double()
    ids = torch.randint(0, 64, (2, 160))
    calls = []
    original = causal_attention.causal_block_attention
    monkeypatch.setattr(causal_attention, "causal_block_attention",
                        lambda *a: calls.append(1) or original(*a))

    def step():
        model.zero_grad()
        loss = model(ids).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step()
    assert len(calls) == config.n_layers
    monkeypatch.setattr(causal_attention, "applies", lambda *a: False)
    reference_loss, reference_grads = step()
    assert len(calls) == config.n_layers  # the second step ran SDPA
    torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=0)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
