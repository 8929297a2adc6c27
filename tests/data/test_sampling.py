"""Batches are a pure function of (seed, step, rank): the basis of exact resume."""

from __future__ import annotations

import itertools

from lmlab.data.sampling import StepBatchSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_starting_late_sees_the_same_batches():
    full = _take(StepBatchSampler(100, 8, seed=3), 30)
    late = _take(StepBatchSampler(100, 8, seed=3, start_step=17), 13)
    assert late == full[17:]


def test_permutation_mode_covers_every_item_once_per_epoch():
    batches = _take(StepBatchSampler(40, 8, seed=0), 5)
    assert sorted(i for b in batches for i in b) == list(range(40))
    next_epoch = _take(StepBatchSampler(40, 8, seed=0, start_step=5), 5)
    assert sorted(i for b in next_epoch for i in b) == list(range(40))
    assert next_epoch != batches  # a new order each epoch


def test_batches_straddling_an_epoch_boundary():
    batches = _take(StepBatchSampler(10, 4, seed=1), 5)  # 20 items = 2 epochs of 10
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))


def test_ranks_take_disjoint_slices():
    r0 = _take(StepBatchSampler(64, 4, seed=0, rank=0, world_size=2), 8)
    r1 = _take(StepBatchSampler(64, 4, seed=0, rank=1, world_size=2), 8)
    flat0, flat1 = {i for b in r0 for i in b}, {i for b in r1 for i in b}
    assert not flat0 & flat1 and flat0 | flat1 == set(range(64))


def test_seed_changes_the_order_and_random_mode_is_in_range():
    assert _take(StepBatchSampler(50, 5, seed=0), 3) != _take(StepBatchSampler(50, 5, seed=1), 3)
    for batch in _take(StepBatchSampler(7, 16, seed=0, mode="random"), 4):
        assert all(0 <= i < 7 for i in batch)


def test_with_step_items_carry_their_step():
    batches = _take(StepBatchSampler(20, 4, seed=0, start_step=3, with_step=True), 2)
    plain = _take(StepBatchSampler(20, 4, seed=0, start_step=3), 2)
    assert [[i for _, i in b] for b in batches] == plain
    assert {s for s, _ in batches[0]} == {3} and {s for s, _ in batches[1]} == {4}
