"""Prefix tuning: attention with prefixes equals explicit concatenation, cached generation equals
recomputation, every family trains only its prefixes, peft's version on model=hf."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab import ConfigError
from lmlab.models.generation import generate
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.cross_attention import CrossAttention
from lmlab.models.layers.mask import build_attention_mask
from lmlab.models.seq2seq_generation import generate_seq2seq
from lmlab.peft import build_peft_strategy, parameter_counts
from lmlab.peft.prefix import PrefixEncoder
from tests.peft.families import (
    DECODERS,
    assert_only_changed,
    batch,
    hf_backbone,
    left_pad,
    make,
    snapshot,
    train,
    train_hf,
)

P = 3


def _prefix(**kw):
    return build_peft_strategy({"method": "prefix", "n_virtual_tokens": P, **kw})


def _naive(attn, x, pk, pv, allowed, bias=None, memory=None):
    """softmax(q [pk; k]^T / sqrt(d) + [0; bias]) [pv; v], KV heads repeated by hand."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    src = x if memory is None else memory
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(src).view(B, src.shape[1], Hkv, D).transpose(1, 2)
    v = attn.v_proj(src).view(B, src.shape[1], Hkv, D).transpose(1, 2)
    k = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // Hkv, 1)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(H // Hkv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if bias is not None:
        scores = scores + torch.cat([torch.zeros(*bias.shape[:-1], P), bias], -1)
    allowed = torch.cat([torch.ones(*allowed.shape[:-1], P, dtype=torch.bool), allowed], -1)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", ["causal", "padding", "bias", "bidirectional"])
def test_prefix_attention_equals_explicit_concatenation(impl, n_kv_heads, mask):
    torch.manual_seed(0)
    B, T = 2, 5
    attn = MultiHeadAttention(32, 4, n_kv_heads, attn_impl=impl, causal=mask != "bidirectional")
    pk, pv = torch.randn(2, 1, n_kv_heads, P, 8).unbind(0)
    attn.prefix_kv = lambda: (pk, pv)
    x = torch.randn(B, T, 32)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn_mask, bias, allowed = None, None, causal[None, None]
    if mask == "bidirectional":
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool)
    if mask == "padding":
        keys = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        attn_mask = build_attention_mask(T, T, keys)
        allowed = (causal & keys.bool()[:, None, :] | torch.eye(T, dtype=torch.bool))[:, None]
    if mask == "bias":  # e.g. ALiBi: the bias covers real keys only
        bias = torch.randn(1, 4, T, T)
        attn_mask = build_attention_mask(T, T, bias=bias)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, attn_mask), _naive(attn, x, pk, pv, allowed, bias),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_cross_attention_prefix_equals_explicit_concatenation(padded):
    torch.manual_seed(0)
    attn = CrossAttention(32, 4, 2)
    pk, pv = torch.randn(2, 1, 2, P, 8).unbind(0)
    attn.prefix_kv = lambda: (pk, pv)
    x, memory = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    src = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]).bool()
    allowed = src[:, None, None, :] if padded else torch.ones(1, 1, 1, 6, dtype=torch.bool)
    with torch.no_grad():
        got = attn(x, attn.project_memory(memory), allowed if padded else None)
        torch.testing.assert_close(got, _naive(attn, x, pk, pv, allowed, memory=memory),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cached_generation_equals_recomputation(name, impl):
    model = make(name, attn_impl=impl, init_std=0.2)  # a base whose greedy outputs vary
    _prefix(reparameterize=name == "gpt").apply(model)
    with torch.no_grad():  # prefixes that matter: far from their near-zero init
        for p in model.prefix_encoder.parameters():
            p.normal_(0, 1.0)
    ids, mask = left_pad([[7, 8, 9, 10, 11, 12], [13, 14, 15]])
    kw = dict(max_new_tokens=8, vocab_size=50)
    cached = generate(model, ids, mask, use_cache=True, **kw)
    assert torch.equal(cached, generate(model, ids, mask, use_cache=False, **kw))
    # Left padding changes nothing for the real tokens (prefixes are not positions).
    assert torch.equal(cached[1], generate(model, ids[1:, 3:], None, **kw)[0])
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_cache(2, 6)
        steps = [model(ids[:, :4], mask[:, :4], cache)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], cache) for t in (4, 5)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        plain = make(name, attn_impl=impl, init_std=0.2).eval()
        assert (plain(ids, mask) - full).abs().max() > 1e-2  # the prefixes act


@pytest.mark.parametrize("name", ["transformer", "t5"])
@pytest.mark.parametrize("cross_attention", [True, False])
def test_seq2seq_cached_decoding_equals_recomputation(name, cross_attention):
    model = make(name).eval()
    _prefix(cross_attention=cross_attention).apply(model)
    with torch.no_grad():
        model.prefix_encoder.prefix.normal_(0, 1.0)
    b = batch(name)
    cached = generate_seq2seq(model, b["src"], b["src_mask"], max_new_tokens=6, bos_id=1,
                              eos_id=None, vocab_size=50)
    tgt = torch.ones(4, 1, dtype=torch.long)  # greedy again, recomputing the whole target
    with torch.no_grad():
        for _ in range(6):
            logits = model(b["src"], b["src_mask"], tgt)[:, -1, :50]
            tgt = torch.cat([tgt, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, tgt[:, 1:])
    n_slots = 2 * 2 + (2 if cross_attention else 0)
    assert model.prefix_encoder.prefix.shape == (n_slots, 2, model.config.kv_heads, P, 8)


@pytest.mark.parametrize("name", [*DECODERS, "bert", "transformer", "t5"])
@pytest.mark.parametrize("reparameterize", [False, True], ids=["direct", "mlp"])
def test_trains_only_the_prefixes(name, reparameterize):
    model = make(name)
    strategy = _prefix(reparameterize=reparameterize, **({"hidden_size": 16} if reparameterize else {}))
    strategy.apply(model)
    before = snapshot(model)
    losses = train(model, name)
    assert losses[-1] < losses[0]
    assert_only_changed(model, before, "prefix_encoder.")
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for p in model.prefix_encoder.parameters())
    assert 0 < counts["trainable"] < counts["total"]


def test_reparameterised_slots_equal_the_full_mlp():
    torch.manual_seed(0)
    enc = PrefixEncoder(3, 4, 2, 8, 32, reparameterize=True, hidden_size=16)
    full = enc.mlp(enc.embedding).view(4, 3, 2, 2, 8).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(enc.all_kv(), full)


def test_mamba_only_backbone_is_refused_naming_both_options():
    with pytest.raises(ConfigError) as info:
        _prefix().check(make("mamba"))
    assert info.value.field == "peft.method"
    assert "prefix" in str(info.value) and "mixer=mamba" in str(info.value)


def test_cannot_merge_and_says_why():
    strategy = _prefix()
    assert strategy.can_merge is False
    with pytest.raises(ConfigError, match="cannot be folded"):
        strategy.merge(make("gpt"))


@pytest.mark.parametrize("fields,field", [
    (dict(n_virtual_tokens=0), "peft.n_virtual_tokens"),
    (dict(hidden_size=8), "peft.hidden_size"),  # without reparameterize
    (dict(init_std=0.0), "peft.init_std"),
])
def test_bad_fields(fields, field):
    with pytest.raises(ConfigError) as info:
        _prefix(**fields)
    assert info.value.field == field


@pytest.mark.parametrize("reparameterize", [False, True], ids=["direct", "mlp"])
def test_hf_prefix_tuning_through_peft_trains_and_generates(tiny_hf_dir, reparameterize):
    from peft import PeftModel

    model = hf_backbone(tiny_hf_dir)
    _prefix(reparameterize=reparameterize).apply(model)
    assert isinstance(model.hf.peft_model, PeftModel)
    before = snapshot(model)
    losses = train_hf(model)
    assert losses[-1] < losses[0]
    assert_only_changed(model, before, "hf.peft_model.prompt_encoder.")
    vocab = model.config.vocab_size
    ids = torch.randint(6, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # lmlab's call path gives what peft's own forward gives
        torch.testing.assert_close(model(ids), model.hf.peft_model(input_ids=ids).logits)
    prompt, mask = left_pad([[7, 8, 9, 10, 11], [12, 13]])
    cached = generate(model, prompt, mask, max_new_tokens=6, vocab_size=vocab)
    assert torch.equal(cached, generate(model, prompt, mask, max_new_tokens=6, vocab_size=vocab,
                                        use_cache=False))
    assert torch.equal(cached[1], generate(model, prompt[1:, 3:], None, max_new_tokens=6,
                                           vocab_size=vocab)[0])


def test_peft_virtual_token_ids_move_to_the_prompt_encoders_device_once(tiny_hf_dir):
    # peft keeps them in a host tensor outside the module tree and copies them to the device
    # in every forward, a blocking copy (a GPU sync per step); lmlab moves them once. A meta
    # prompt encoder stands in for a GPU one here.
    model = hf_backbone(tiny_hf_dir)
    _prefix().apply(model)
    wrapper, peft_model = model.hf, model.hf.peft_model
    adapter = peft_model.active_adapter
    peft_model.prompt_encoder[adapter].to("meta")
    wrapper._prompt(2)
    moved = peft_model.prompt_tokens[adapter]
    assert moved.device.type == "meta"
    wrapper._prompt(2)
    assert peft_model.prompt_tokens[adapter] is moved
