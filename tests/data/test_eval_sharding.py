"""Evaluation batches shared out across ranks: every item once, equal non-empty shares."""

from __future__ import annotations

import itertools

import pytest

from lmlab.data.eval_sharding import eval_batches, share_of_decoding


def test_one_process_gets_a_dataloaders_own_batches():
    assert eval_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert eval_batches(0, 4) == []


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_ranks_split_the_items_in_equal_numbers_of_batches(world):
    for n_items, batch_size in itertools.product(range(0, 60), range(1, 10)):
        shares = [eval_batches(n_items, batch_size, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1, (n_items, batch_size)  # collectives pair up
        if n_items < world:  # not an item for every rank: everything everywhere
            assert all(share == eval_batches(n_items, batch_size) for share in shares)
            continue
        batches = [batch for share in shares for batch in share]
        # Batches of 2 only where batch_size 1 (or a handful of items) leaves no other way.
        assert all(0 < len(batch) <= max(batch_size, 2) for batch in batches), (n_items, batch_size)
        if batch_size > 1 and n_items >= 2 * (world + 1):
            assert all(len(batch) <= batch_size for batch in batches), (n_items, batch_size)
        assert sorted(i for batch in batches for i in batch) == list(range(n_items))
        # No more batches than a multiple of the ranks needs.
        assert len(batches) < -(-n_items // batch_size) + world


def test_every_rank_gets_a_share_once_there_are_enough_items():
    assert eval_batches(10, 3, 0, 2) == [[0, 1], [5, 6]]
    assert eval_batches(10, 3, 1, 2) == [[2, 3, 4], [7, 8, 9]]
    assert eval_batches(8, 16, 1, 2) == [[4, 5, 6, 7]]
    # Batch size 1, 5 items, 2 ranks: 2 batches each, one of them of 2 items.
    assert eval_batches(5, 1, 0, 2) == [[0], [2]]
    assert eval_batches(5, 1, 1, 2) == [[1], [3, 4]]
    # 1 item, 2 ranks: both run it (each rank needs a batch), and the meters' sums count it
    # twice in numerator and denominator alike.
    assert eval_batches(1, 4, 0, 2) == eval_batches(1, 4, 1, 2) == [[0]]


def test_decoding_share_covers_the_first_batches():
    assert share_of_decoding(None, 4) is None
    assert share_of_decoding(3, 1) == 3
    assert share_of_decoding(3, 2) == 2
    assert share_of_decoding(0, 2) == 0
