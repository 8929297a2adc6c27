"""Prompt tuning: a soft prompt equal to some tokens' embeddings acts exactly like those tokens
prepended to the input; cached generation equals recomputation; every family trains only the
prompt; peft's version on model=hf."""

from __future__ import annotations

import pytest
import torch

from lmlab import ConfigError
from lmlab.models.generation import generate
from lmlab.models.seq2seq_generation import generate_seq2seq
from lmlab.peft import build_peft_strategy, parameter_counts
from lmlab.tokenizers import build_tokenizer
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
PROMPT_IDS = torch.tensor([40, 41, 42])


def _prompt(**kw):
    return build_peft_strategy({"method": "prompt", "n_virtual_tokens": P, **kw})


def _as_tokens(model):
    """Set the soft prompt to the embeddings of PROMPT_IDS."""
    with torch.no_grad():
        model.soft_prompt.embedding.copy_(model.embed_tokens.weight[PROMPT_IDS])
    return model


@pytest.mark.parametrize("name", [*DECODERS, "mamba"])
def test_decoder_prompt_equals_prepended_tokens(name):
    base = make(name).eval()
    model = make(name).eval()
    _prompt().apply(model)
    _as_tokens(model)
    rows = [[7, 8, 9, 10, 11], [12, 13]]
    ids, mask = left_pad(rows)
    # The prompt goes right before each row's first real token, after the left padding.
    ref_ids, ref_mask = left_pad([PROMPT_IDS.tolist() + row for row in rows])
    with torch.no_grad():
        got = model(ids, mask)
        assert got.shape == (2, 5, 64)  # the input's positions only
        ref = base(ref_ids, ref_mask)
        torch.testing.assert_close(got[0], ref[0, P:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, 3:], ref[1, P + 3:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.hidden(ids[:1]), base.hidden(ref_ids[:1])[:, P:])


@pytest.mark.parametrize("name", DECODERS + ["mamba"])
def test_cached_generation_equals_recomputation(name):
    model = make(name, init_std=0.2)  # a base whose greedy outputs vary
    _prompt(init="random", init_std=1.0).apply(model)
    ids, mask = left_pad([[7, 8, 9, 10, 11, 12], [13, 14, 15]])
    kw = dict(max_new_tokens=8, vocab_size=50)
    cached = generate(model, ids, mask, use_cache=True, **kw)
    assert torch.equal(cached, generate(model, ids, mask, use_cache=False, **kw))
    assert torch.equal(cached[1], generate(model, ids[1:, 3:], None, **kw)[0])
    with torch.no_grad():
        model.eval()
        full = model(ids, mask)
        cache = model.new_cache(2, 6)  # room for the prompt is added by the model
        steps = [model(ids[:, :4], mask[:, :4], cache)]
        assert cache.length == P + 4
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], cache) for t in (4, 5)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_encoder_prompt_equals_prepended_tokens():
    base, model = make("bert").eval(), make("bert").eval()
    _prompt().apply(model)
    _as_tokens(model)
    b = batch("bert")
    with torch.no_grad():
        got = model(b["ids"], b["mask"])
        assert got.shape == (4, 9, 32)
        ref = base(torch.cat([PROMPT_IDS.expand(4, -1), b["ids"]], 1),
                   torch.cat([torch.ones(4, P, dtype=torch.long), b["mask"]], 1))[:, P:]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "t5"])
def test_encoder_decoder_prompt_equals_prepended_source_tokens_and_decodes(name):
    base, model = make(name).eval(), make(name).eval()
    _prompt().apply(model)
    _as_tokens(model)
    b = batch(name)
    src_mask = torch.cat([torch.ones(4, P, dtype=torch.long), b["src_mask"]], 1)
    ref_src = torch.cat([PROMPT_IDS.expand(4, -1), b["src"]], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(b["src"], b["src_mask"], b["tgt"]),
                                   base(ref_src, src_mask, b["tgt"]), atol=1e-5, rtol=1e-5)
    for beams in (1, 3):  # cached decoding (greedy, beam) sees the prompt like the base does
        kw = dict(max_new_tokens=6, bos_id=1, eos_id=2, vocab_size=50, num_beams=beams)
        assert torch.equal(generate_seq2seq(model, b["src"], b["src_mask"], **kw),
                           generate_seq2seq(base, ref_src, src_mask, **kw))


@pytest.mark.parametrize("name", [*DECODERS, "mamba", "bert", "transformer", "t5"])
def test_trains_only_the_prompt(name):
    model = make(name)
    _prompt(n_virtual_tokens=4).apply(model)
    before = snapshot(model)
    losses = train(model, name)
    assert losses[-1] < losses[0]
    assert_only_changed(model, before, "soft_prompt.")
    counts = parameter_counts(model)
    assert counts["trainable"] == 4 * 32 and counts["total"] > 4 * 32


def test_initialisations():
    model = make("gpt", vocab_size=262)
    strategy = _prompt(n_virtual_tokens=5, init="text", init_text="ab")
    strategy.use_tokenizer(build_tokenizer({"kind": "byte"}))
    strategy.apply(model)
    ids = build_tokenizer({"kind": "byte"}).encode("ab")
    expected = model.embed_tokens.weight[torch.tensor((ids * 3)[:5])]
    assert torch.equal(model.soft_prompt.embedding, expected)  # repeated to length

    model = make("gpt")
    _prompt(n_virtual_tokens=20).apply(model)
    rows = model.soft_prompt.embedding
    table = model.embed_tokens.weight[6:50]  # ordinary tokens: no specials, no vocab padding
    assert all((table == row).all(-1).any() for row in rows)
    assert len({tuple(r.tolist()) for r in rows}) == 20  # drawn without replacement

    model = make("gpt")
    _prompt(n_virtual_tokens=200, init="random", init_std=0.5).apply(model)
    assert abs(model.soft_prompt.embedding.std().item() - 0.5) < 0.05


def test_cannot_merge_and_says_why():
    assert _prompt().can_merge is False
    with pytest.raises(ConfigError, match="cannot be folded"):
        _prompt().merge(make("gpt"))


@pytest.mark.parametrize("fields,field", [
    (dict(n_virtual_tokens=0), "peft.n_virtual_tokens"),
    (dict(init="zeros"), "peft.init"),
    (dict(init="text"), "peft.init_text"),
    (dict(init_std=-1.0), "peft.init_std"),
])
def test_bad_fields(fields, field):
    with pytest.raises(ConfigError) as info:
        _prompt(**fields)
    assert info.value.field == field


def test_learned_positions_must_hold_the_prompt():
    from lmlab.models import ModelConfig

    config = ModelConfig(**{"vocab_size": 50, "max_seq_len": 32})
    _prompt(n_virtual_tokens=8).check_lengths(24, config)
    with pytest.raises(ConfigError) as info:
        _prompt(n_virtual_tokens=9).check_lengths(24, config)
    assert info.value.field == "peft.n_virtual_tokens" and "model.max_seq_len=32" in str(info.value)
    _prompt(n_virtual_tokens=9).check_lengths(24, ModelConfig(vocab_size=50, max_seq_len=32,
                                                              position="rope"))


def test_hf_prompt_tuning_through_peft_trains_and_generates(tiny_hf_dir):
    from peft import PeftModel

    model = hf_backbone(tiny_hf_dir)
    _prompt(n_virtual_tokens=4).apply(model)
    assert isinstance(model.hf.peft_model, PeftModel)
    before = snapshot(model)
    losses = train_hf(model)
    assert losses[-1] < losses[0]
    assert_only_changed(model, before, "hf.peft_model.prompt_encoder.")
    vocab = model.config.vocab_size
    ids = torch.randint(6, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # lmlab's call path gives what peft's own forward gives
        torch.testing.assert_close(model(ids), model.hf.peft_model(input_ids=ids).logits[:, 4:])
        assert model.hidden(ids).shape == (2, 7, 32)
    prompt, mask = left_pad([[7, 8, 9, 10, 11], [12, 13]])
    cached = generate(model, prompt, mask, max_new_tokens=6, vocab_size=vocab)
    assert torch.equal(cached, generate(model, prompt, mask, max_new_tokens=6, vocab_size=vocab,
                                        use_cache=False))
    assert torch.equal(cached[1], generate(model, prompt[1:, 3:], None, max_new_tokens=6,
                                           vocab_size=vocab)[0])
