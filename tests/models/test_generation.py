"""The generation loop's fast paths give what the plain loop gives.

The reference is written out here as the loop was before its optimisations: full logits of
every position, a mask grown by concatenation each step, masking of the padded vocabulary.
"""

import pytest
import torch
from torch import nn

from lmlab.models import generate
from lmlab.models.generation import last_logits


def reference_generate(model, ids, mask, n):
    """Greedy decoding, recomputing everything each step: model(...)[:, -1] of the padded
    vocabulary with the extra ids at -inf, mask extended by torch.cat."""
    vocab = model.config.vocab_size
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, attention_mask=mask)[:, -1].clone()
            logits[:, vocab:] = float("-inf")
            nxt = logits.argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def record_masks(model):
    """Wrap model.hidden so each call's attention_mask is kept (None or a tensor)."""
    seen = []
    hidden = model.hidden

    def spy(ids, attention_mask=None, cache=None):
        seen.append(attention_mask)
        return hidden(ids, attention_mask, cache)

    model.hidden = spy
    return seen


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_equals_the_plain_loop(make_model, left_pad, position, use_cache):
    model = make_model(position=position, n_kv_heads=2, init_std=0.2)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]])
    fast = generate(model, ids, mask, max_new_tokens=7, use_cache=use_cache)
    assert torch.equal(fast, reference_generate(model, ids, mask, 7))


def test_unpadded_prompts_decode_without_any_mask(make_model):
    model = make_model(n_kv_heads=2, init_std=0.2)
    ids = torch.randint(1, 50, (3, 6))
    masked = reference_generate(model, ids, torch.ones_like(ids), 8)
    seen = record_masks(model)
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=8)
    assert len(seen) == 8 and all(m is None for m in seen)
    assert torch.equal(out, masked)
    assert torch.equal(out, generate(model, ids, None, max_new_tokens=8))


def test_mask_free_decode_step_equals_masked_decode_step(make_model):
    """One cached single-token step: no mask, and an all-ones mask over cache + new token."""
    model = make_model(n_kv_heads=2)
    ids = torch.randint(1, 50, (2, 7))
    with torch.no_grad():
        steps = []
        for mask in (None, torch.ones(2, 7, dtype=torch.long)):
            cache = model.new_cache(2, 7)
            model(ids[:, :6], None if mask is None else mask[:, :6], cache=cache)
            steps.append(model(ids[:, 6:], mask, cache=cache))
    torch.testing.assert_close(steps[0], steps[1], atol=1e-6, rtol=0)


def test_padded_prompts_share_one_preallocated_mask(make_model, left_pad):
    model = make_model(n_kv_heads=2, init_std=0.2)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    seen = record_masks(model)
    generate(model, ids, mask, max_new_tokens=5)
    assert [m.shape[1] for m in seen] == [4, 5, 6, 7, 8]
    assert len({m.untyped_storage().data_ptr() for m in seen}) == 1
    assert torch.equal(seen[-1][:, :4], mask) and seen[-1][:, 4:].eq(1).all()


def test_prefill_applies_the_output_layer_to_the_last_position_only(make_model):
    model = make_model(init_std=0.2)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    ids = torch.randint(1, 50, (2, 9))
    out = generate(model, ids, max_new_tokens=3)
    assert rows == [(2, 32)] * 3
    assert torch.equal(out, reference_generate(model, ids, None, 3))
    with torch.no_grad():
        torch.testing.assert_close(last_logits(model, ids, None, None), model(ids)[:, -1])


class Wrapped(nn.Module):
    """A backbone that is not a DecoderLM (as an HF model is): generation calls forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, ids, attention_mask=None, cache=None):
        return self.inner(ids, attention_mask, cache)

    def new_cache(self, batch_size, max_len):
        return self.inner.new_cache(batch_size, max_len)


def test_other_backbones_run_their_own_forward(make_model, left_pad):
    model = make_model(n_kv_heads=2, init_std=0.2)
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    assert torch.equal(generate(Wrapped(model), ids, mask, max_new_tokens=5),
                       generate(model, ids, mask, max_new_tokens=5))


def test_greedy_never_picks_a_padding_id(make_model):
    model = make_model(vocab_size=10, init_std=0.2)  # 64 logits, 10 real
    with torch.no_grad():
        model.lm_head.weight[10:] = model.lm_head.weight[:10].sum(0) * 50
    out = generate(model, torch.tensor([[1, 2, 3]] * 3), max_new_tokens=6)
    assert out.max() < 10
    assert torch.equal(out, reference_generate(model, torch.tensor([[1, 2, 3]] * 3), None, 6))


def test_model_trains_after_generation(make_model):
    """Generation runs under inference_mode: nothing it returns or leaves behind may keep the
    model from training afterwards."""
    model = make_model(n_kv_heads=2).train()
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert not out.is_inference() and model.training
    loss = model(torch.cat([torch.tensor([[1, 2, 3]]), out], 1)).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("every", [1, 3, 100])
def test_checking_for_eos_every_few_steps_changes_nothing(make_model, monkeypatch, every):
    """Off CPU `done` is read back every few steps; the extra steps must only write pads."""
    import lmlab.models.generation as generation

    model = make_model(init_std=0.2)
    prompt = torch.randint(1, 50, (3, 4))
    free = generate(model, prompt, max_new_tokens=9)
    eos = int(free[0, 2])
    expected = generate(model, prompt, max_new_tokens=9, eos_id=eos, pad_id=-1)
    monkeypatch.setitem(generation.EOS_CHECK_EVERY, "cpu", every)
    assert torch.equal(generate(model, prompt, max_new_tokens=9, eos_id=eos, pad_id=-1), expected)
    assert (expected[0, 3:] == -1).all()
