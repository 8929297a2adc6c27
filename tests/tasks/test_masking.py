"""BERT masking statistics: 15% chosen, 80/10/10, specials never chosen, seeded."""

from __future__ import annotations

import torch

from lmlab.data.collate import IGNORE_INDEX
from lmlab.tasks.masking import bert_mask, seeded_generator

MASK, N_SPECIAL, VOCAB = 4, 6, 500


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(N_SPECIAL, VOCAB, (64, 256), generator=g)
    ids[:, 0], ids[:, 100] = 1, 5  # <bos>, <sep> inside real text
    mask = torch.ones_like(ids)
    ids[:, 200:], mask[:, 200:] = 0, 0  # padding
    return ids, mask


def test_masking_statistics():
    ids, mask = _batch()
    masked, labels = bert_mask(ids, mask, MASK, N_SPECIAL, VOCAB, generator=seeded_generator(0))
    chosen = labels != IGNORE_INDEX
    eligible = (ids >= N_SPECIAL) & mask.bool()
    assert not chosen[~eligible].any()  # specials and pads are never chosen
    share = chosen.sum() / eligible.sum()
    assert 0.14 < share < 0.16
    assert (labels[chosen] == ids[chosen]).all()
    n = chosen.sum()
    to_mask = (masked == MASK) & chosen
    changed = (masked != ids) & chosen & ~to_mask
    unchanged = (masked == ids) & chosen
    assert 0.77 < to_mask.sum() / n < 0.83
    # a random replacement may draw the original id (1 in 494), counted as unchanged here
    assert 0.08 < changed.sum() / n < 0.12 and 0.08 < unchanged.sum() / n < 0.12
    assert (masked[changed] >= N_SPECIAL).all() and (masked[changed] < VOCAB).all()
    assert (masked[~chosen] == ids[~chosen]).all()


def test_masking_is_a_function_of_the_seed():
    ids, mask = _batch()
    a = bert_mask(ids, mask, MASK, N_SPECIAL, VOCAB, generator=seeded_generator(7, 1, 0, 3))
    b = bert_mask(ids, mask, MASK, N_SPECIAL, VOCAB, generator=seeded_generator(7, 1, 0, 3))
    c = bert_mask(ids, mask, MASK, N_SPECIAL, VOCAB, generator=seeded_generator(7, 1, 0, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
