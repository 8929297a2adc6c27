"""learned_bias_attention against a naive float64 reference, and against SDPA inside a T5."""

import math

import pytest
import torch
from torch import nn

import lmlab.models.layers.biased_attention as biased
from lmlab.models import EncoderDecoderModel, ModelConfig
from lmlab.models.layers.biased_attention import applies, learned_bias_attention


def naive(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v, written out with einsum."""
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1]) + bias
    return torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v)


CASES = {
    # name: (causal, T, S, bias shape); T > ROWS_PER_BLOCK splits causal layers into blocks.
    "causal-blocks": (True, 150, 150, (1, 3, 150, 150)),
    "causal-cached": (True, 70, 90, (2, 3, 70, 90)),  # queries are the last 70 of 90 keys
    "causal-one-block": (True, 20, 20, (1, 3, 20, 20)),
    "bidirectional-per-row": (False, 50, 60, (2, 3, 50, 60)),
    "bidirectional-shared-heads": (False, 50, 60, (2, 1, 50, 60)),
    "bidirectional-shared-rows": (False, 50, 60, (1, 3, 50, 60)),
}


def _inputs(T: int, S: int, bias_shape: tuple[int, ...]):
    """(generator, q [2, 3, T, 8], k, v [2, 3, S, 8], a bias table), float64, needing gradients."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, S, 8, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    table = torch.randn(bias_shape, generator=g, dtype=torch.float64, requires_grad=True)
    return g, q, k, v, table


def _assert_same_values_and_gradients(ours, reference, inputs, g):
    grad = torch.randn(reference.shape, generator=g, dtype=torch.float64)
    ours_grads = torch.autograd.grad(ours, inputs, grad, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, inputs, grad)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-10)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive_reference(name):
    causal, T, S, shape = CASES[name]
    g, q, k, v, table = _inputs(T, S, shape)
    allowed = torch.ones(T, S, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(S - T)  # bottom-right aligned
    if shape[0] == 2:  # padding: row 1 has no last 5 keys (its queries keep their own key)
        allowed = allowed.expand(2, 1, T, S).clone()
        allowed[1, ..., S - 5:] = False
        allowed[1, 0, torch.arange(T - 5, T), torch.arange(S - 5, S)] = True
    bias = table.masked_fill(~allowed, float("-inf"))
    ours = learned_bias_attention(q, k, v, bias, causal=causal)
    reference = naive(q, k, v, bias)
    _assert_same_values_and_gradients(ours, reference, (q, k, v, table), g)


def test_applies_only_to_a_learned_bias():
    q = k = torch.zeros(1, 2, 4, 8)
    learned = torch.zeros(1, 2, 4, 4, requires_grad=True)
    assert applies(q, k, learned, 0.0)
    assert applies(q, k, learned, 0.1)
    assert not applies(q, k, learned.detach(), 0.0)  # ALiBi, or no gradient needed
    assert not applies(q, k, torch.ones(1, 1, 4, 4, dtype=torch.bool), 0.0)
    assert not applies(q, k, None, 0.0)
    assert not applies(q, k[:, :1], learned, 0.0)  # grouped KV heads
    assert not applies(q.bfloat16(), k.bfloat16(), learned.bfloat16(), 0.0)  # reduced precision: SDPA


@pytest.mark.parametrize("name", ["causal-blocks", "bidirectional-shared-rows"])
def test_dropout_matches_naive_reference_with_the_same_keep_masks(name, monkeypatch):
    causal, T, S, shape = CASES[name]
    g, q, k, v, table = _inputs(T, S, shape)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S).bool()
    bias = table.masked_fill(~allowed, float("-inf"))
    masks = []
    monkeypatch.setattr(biased, "keep_mask", lambda *a: masks.append(torch.rand(*a[:1]) >= 0.2)
                        or masks[-1])
    ours = learned_bias_attention(q, k, v, bias, causal=causal, dropout_p=0.2)
    keep = torch.ones(2, 3, T, S, dtype=torch.bool)  # masked keys: p = 0 whatever is kept
    spans = biased._spans(T, S, causal)
    assert len(masks) == len(spans)
    for mask, (t0, t1, s1) in zip(masks, spans):
        keep[:, :, t0:t1, :s1] = mask.view(2, 3, t1 - t0, s1)
    probs = (torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(8) + bias).softmax(-1)
    reference = torch.einsum("bhts,bhsd->bhtd", probs * keep / 0.8, v)
    assert 0.7 < keep[..., allowed].float().mean() < 0.9
    _assert_same_values_and_gradients(ours, reference, (q, k, v, table), g)


T5 = dict(family="encoder_decoder", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
          max_seq_len=32, position="relative", norm="rmsnorm", ffn="swiglu", bias=False,
          relative_buckets=8, relative_max_distance=16)


def _step(model, src, src_mask, tgt):
    logits = model(src, src_mask, tgt[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(),
                                       ignore_index=0)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads


def test_t5_training_step_equals_sdpa(monkeypatch):
    """A T5's loss and every gradient, with the learned-bias path and with SDPA's math path
    (what it replaced); long enough targets for several causal blocks, padded sources."""
    torch.manual_seed(0)
    model = EncoderDecoderModel(ModelConfig(**T5)).train()
    src = torch.randint(3, 50, (2, 70))
    src_mask = torch.ones_like(src)
    src_mask[1, 60:] = 0
    tgt = torch.randint(3, 50, (2, 151))
    tgt[1, 140:] = 0
    calls = []
    original = biased.LearnedBiasAttention.apply
    monkeypatch.setattr(biased.LearnedBiasAttention, "apply",
                        lambda *a: calls.append(1) or original(*a))
    loss, grads = _step(model, src, src_mask, tgt)
    assert len(calls) == 4  # every self-attention layer (2 encoder, 2 decoder)
    monkeypatch.setattr(biased, "applies", lambda *a: False)
    sdpa_loss, sdpa_grads = _step(model, src, src_mask, tgt)
    torch.testing.assert_close(loss, sdpa_loss)
    for (name, _), a, b in zip(model.named_parameters(), grads, sdpa_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)

