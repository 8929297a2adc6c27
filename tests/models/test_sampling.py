"""Next-token choice: filters keep exactly the right tokens; sampling is reproducible."""

import pytest
import torch

from lmlab.models import generate
from lmlab.models.sampling import choose_next, mask_padded_vocab, top_k_filter, top_p_filter


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    assert _kept(top_k_filter(logits, 3)) == {1, 3, 5}
    assert _kept(top_k_filter(logits, 1)) == {1}
    assert _kept(top_k_filter(logits, 100)) == set(range(6))
    kept = top_k_filter(logits, 3)
    assert torch.equal(kept[0, [1, 3, 5]], logits[0, [1, 3, 5]])  # survivors untouched


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    assert _kept(top_p_filter(logits, 0.5)) == {1}  # 0.5 alone reaches 0.5
    assert _kept(top_p_filter(logits, 0.6)) == {1, 3}  # 0.8 after the crossing token
    assert _kept(top_p_filter(logits, 0.85)) == {1, 3, 2}
    assert _kept(top_p_filter(logits, 0.01)) == {1}  # the top token always survives
    assert _kept(top_p_filter(logits, 1.0)) == set(range(5))


def test_top_p_is_per_row():
    logits = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]).log()
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False], [False, True, True]]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 30)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([choose_next(logits, 1.0, 10, 0.9, g) for _ in range(20)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_greedy_is_argmax():
    logits = torch.randn(3, 10)
    assert torch.equal(choose_next(logits), logits.argmax(-1))


def test_padded_vocab_is_never_chosen(make_model):
    logits = torch.zeros(2, 8)
    logits[:, 6:] = 100.0
    masked = mask_padded_vocab(logits, 6)
    assert masked.argmax(-1).lt(6).all()
    model = make_model(vocab_size=10)  # padded to 64 logits
    with torch.no_grad():  # a zero final norm makes every logit 0, padding ids included
        model.norm.weight.zero_()
        model.norm.bias.zero_()
    g = torch.Generator().manual_seed(0)
    out = generate(model, torch.tensor([[1, 2, 3]] * 4), max_new_tokens=20, temperature=2.0,
                   generator=g)
    assert out.max() < 10
    assert out.unique().numel() > 1  # really sampled from a uniform over the 10 real ids


def test_generate_eos_pads_and_stops(make_model):
    model = make_model(init_std=0.2)
    prompt = torch.randint(1, 50, (3, 4))
    free = generate(model, prompt, max_new_tokens=6)
    eos = int(free[0, 1])
    out = generate(model, prompt, max_new_tokens=6, eos_id=eos, pad_id=-1)
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits) == 0:
            assert torch.equal(out[row], free[row])
        else:
            stop = int(hits[0])
            assert torch.equal(out[row, : stop + 1], free[row, : stop + 1])
            assert (out[row, stop + 1 :] == -1).all()


def test_generate_restores_training_mode_and_keeps_no_graph(make_model):
    model = make_model().train()
    out = generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, temperature=1.0, top_k=5)
    assert model.training and out.dtype == torch.long and not out.requires_grad


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_zero_new_tokens(make_model, use_cache):
    out = generate(make_model(), torch.tensor([[1, 2]]), max_new_tokens=0, use_cache=use_cache)
    assert out.shape == (1, 0)
