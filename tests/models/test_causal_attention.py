"""The CPU causal block attention against SDPA in float64: values and every gradient, for
MHA, GQA and MQA, at lengths on and off the block size; when it is used, and a decoder step
through it against the same step on SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import ModelConfig, build_backbone
from lmlab.models.layers import causal_attention
from lmlab.models.layers.causal_attention import (
    CPU_BF16_EMULATED,
    applies,
    causal_block_attention,
)
from lmlab.precision import Bf16MatmulsInFp32
from tests.bf16_close import BF16_ULP, assert_bf16_close


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


def test_used_only_for_causal_cpu_training_at_its_lengths():
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
        assert not applies(q, k, True, None, 0.0)                   # an fp32 call under autocast
    # bf16 training keeps SDPA where bf16 GEMMs are native, else is computed here in fp32.
    assert applies(q.bfloat16(), k.bfloat16(), True, None, 0.0) == CPU_BF16_EMULATED
    assert not applies(q.bfloat16(), k, True, None, 0.0)            # mixed dtypes: SDPA's error


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


@pytest.mark.parametrize("operands", ["autocast", "bf16"])
def test_bf16_is_sdpa_in_fp32_on_the_rounded_operands(operands):
    """What `lmlab.precision` makes of a bf16 SDPA call on a CPU without bf16 GEMMs: the same
    output (rounded to bf16) and gradients, here with the fp32 blocks."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(2, h, 160, 16, generator=gen) for h in (4, 2, 2)]
    d_out = torch.randn(2, 4, 160, 16, generator=gen)

    def attend(blocked: bool):
        leaves = [t.clone().requires_grad_() for t in base]
        with torch.autocast("cpu", torch.bfloat16, enabled=operands == "autocast"):
            q, k, v = (t.bfloat16() for t in leaves)  # as autocast's projections return them
            if blocked:
                out = causal_block_attention(q, k, v)
            else:
                with torch.autocast("cpu", enabled=False):
                    out = F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
                    ).bfloat16()
        out.float().backward(d_out)
        return out, [t.grad for t in leaves]

    out, grads = attend(True)
    reference, reference_grads = attend(False)
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, reference)
    for a, b in zip(grads, reference_grads):
        assert_bf16_close(a, b)
    # Backward inside autocast (which PyTorch advises against) multiplies in fp32 all the same.
    leaves = [t.clone().requires_grad_() for t in base]
    with torch.autocast("cpu", torch.bfloat16):
        causal_block_attention(*(t.bfloat16() for t in leaves)).float().backward(d_out)
    for a, b in zip((t.grad for t in leaves), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bf16_decoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                      n_kv_heads=2, ffn="swiglu", norm="rmsnorm",
                                      position="rope", bias=False, max_seq_len=256))


def test_an_emulated_bf16_step_takes_the_blocks_and_equals_the_sdpa_step(monkeypatch):
    """A decoder step under bf16 autocast and `lmlab.precision`'s emulation, as a Lightning
    bf16-mixed run on a CPU without bf16 GEMMs makes it (posed as one on any CPU): the blocks
    in every layer, the SDPA step's values."""
    monkeypatch.setattr(causal_attention, "CPU_BF16_EMULATED", True)
    ids = torch.randint(0, 64, (2, 160), generator=torch.Generator().manual_seed(1))
    calls = []
    original = causal_attention.causal_block_attention
    monkeypatch.setattr(causal_attention, "causal_block_attention",
                        lambda *a: calls.append(a[0].dtype) or original(*a))

    def step():
        model = _bf16_decoder()
        with torch.autocast("cpu", torch.bfloat16), Bf16MatmulsInFp32():
            loss = model(ids).float().square().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss, grads = step()
    assert calls == [torch.bfloat16] * 2
    monkeypatch.setattr(causal_attention, "applies", lambda *a: False)
    reference_loss, reference_grads = step()
    assert len(calls) == 2  # the second step ran SDPA (in fp32, through lmlab.precision)
    assert abs(loss.item() - reference_loss.item()) <= 4 * BF16_ULP * reference_loss.item()
    for a, b in zip(grads, reference_grads):
        scale = b.abs().max().clamp_min(1e-6)
        assert ((a - b).abs().max() / scale).item() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_step_traces_the_blocks(precision, monkeypatch):
    """`model.compile=true`: dynamo traces the decision, the Function and its autocast-free
    backward without a graph break, the compiled step takes the blocks in every layer and
    keeps the eager values."""
    monkeypatch.setattr(causal_attention, "CPU_BF16_EMULATED", True)
    calls = []
    original = causal_attention.causal_block_attention
    monkeypatch.setattr(causal_attention, "causal_block_attention",
                        lambda *a: calls.append(a[0].dtype) or original(*a))
    ids = torch.randint(0, 64, (2, 160), generator=torch.Generator().manual_seed(2))
    bf16 = precision == "bf16"
    results = []
    for compiled in (False, True):
        model = _bf16_decoder()
        module = torch.compile(model, fullgraph=True) if compiled else model
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16), \
                Bf16MatmulsInFp32() if bf16 else torch.autocast("cpu", enabled=False):
            loss = module(ids).float().square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
        # Each layer's call, traced or eager, in the attention's input dtype.
        assert calls == [torch.bfloat16 if bf16 else torch.float32] * 2
        calls.clear()
    torch._dynamo.reset()
    (loss, grads), (compiled_loss, compiled_grads) = results
    tolerance = 4 * BF16_ULP if bf16 else 1e-5
    assert abs(compiled_loss.item() - loss.item()) <= tolerance * loss.item()
    for a, b in zip(compiled_grads, grads):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() < (
            0.05 if bf16 else 1e-4)
