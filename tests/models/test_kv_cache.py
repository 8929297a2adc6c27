"""Incremental decoding with a KV cache must reproduce full recomputation exactly."""

import pytest
import torch

from lmlab.models import generate

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]
ATOL = 1e-5


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cached_logits_equal_full_forward(make_model, position, kv_heads):
    model = make_model(position=position, n_kv_heads=kv_heads)
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids)
    cache = model.new_cache(2, 9)
    pieces = [model(ids[:, :5], cache=cache)]  # prefill
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 8)]
    pieces.append(model(ids[:, 8:], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    assert cache.length == 9


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_logits_with_left_padding(make_model, position, left_pad):
    model = make_model(position=position, n_kv_heads=2)
    ids, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10, 11]])
    more = torch.tensor([[12, 13], [14, 15]])
    full_ids = torch.cat([ids, more], 1)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
    full = model(full_ids, full_mask)
    cache = model.new_cache(2, 8)
    out = [model(ids, mask, cache=cache)]
    out.append(model(more[:, :1], full_mask[:, :7], cache=cache))
    out.append(model(more[:, 1:], full_mask, cache=cache))
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(out, 1)[real], full[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_cached_generation_equals_recomputation(make_model, position, kv_heads):
    model = make_model(position=position, n_kv_heads=kv_heads, init_std=0.2)
    prompt = torch.randint(1, 50, (2, 5))
    cached = generate(model, prompt, max_new_tokens=8, use_cache=True)
    recomputed = generate(model, prompt, max_new_tokens=8, use_cache=False)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padded_batch_equals_each_prompt_alone(make_model, position, left_pad):
    model = make_model(position=position, n_kv_heads=2, init_std=0.2)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(prompts)
    batched = generate(model, ids, mask, max_new_tokens=6)
    batched_ref = generate(model, ids, mask, max_new_tokens=6, use_cache=False)
    assert torch.equal(batched, batched_ref)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=6)
        assert torch.equal(batched[row], alone[0]), (row, batched[row], alone[0])


def test_cache_overflow_and_learned_max_seq_len(make_model):
    from lmlab.errors import ConfigError

    model = make_model(position="learned", max_seq_len=8)
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = model.new_cache(1, 16)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    small = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=small)
    # Positions with no table limit extrapolate past max_seq_len.
    rope = make_model(position="rope", max_seq_len=8)
    assert rope(torch.zeros(1, 12, dtype=torch.long)).shape == (1, 12, 64)
