"""Validation shared out across 2 CPU processes (gloo): each rank runs its own part of the split
(lmlab.data.eval_sharding), and the logged numbers are the whole split's, as one process logs
them. The weights stay at their (seeded, rank-independent) initialisation (lr 0), so the
single-process run validates the same model; generation runs, but an oracle decides which
items it gets right, so exact match, BLEU and chrF must be the single process's exactly."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmlab.record import read_record
from tests.strategies.test_multiprocess import TINY, train

# 40 validation items (10 per synthetic task): one process runs 14 batches (13 of 3, one of
# 1), each of 2 ranks 7 batches of 2 or 3.
SHARED = [*TINY, "data.n_val=10", "data.eval_batch_size=3", "trainer.limit_val_batches=null",
          "trainer.max_steps=2", "trainer.val_check_interval=2", "optimizer.lr=0",
          # Lightning launches again for validate/test after fit: the ranks started at fit serve them.
          "validate_after_fit=true", "test=true", "data.n_test=10", "trainer.limit_test_batches=null",
          "+callbacks.eval_rows._target_=tests.strategies.eval_rows.DumpEvalRows",
          "+callbacks.oracle._target_=tests.strategies.eval_rows.OracleDecoding"]


def validate(tmp_path, name: str, args: list[str]) -> tuple[dict, list[list[list[list[int]]]]]:
    run_dir, dumps = tmp_path / name, tmp_path / f"{name}_rows"
    train([*SHARED, *args, f"hydra.run.dir={run_dir}", f"+callbacks.eval_rows.dirpath={dumps}",
           f"paths.cache_dir={tmp_path / 'cache'}"])
    ranks = sorted(dumps.glob("eval_rank*.json"))
    return read_record(run_dir)["metrics"], [json.loads(path.read_text()) for path in ranks]


def scores(metrics: dict[str, float]) -> dict[str, float]:
    """Exact match, BLEU, chrF: what the oracle decides."""
    return {k: v for k, v in metrics.items()
            if k.startswith(("val/", "test/")) and "/loss" not in k and "/ppl" not in k}


def rows(batches: list[list[list[int]]]) -> Counter:
    return Counter(tuple(row) for batch in batches for row in batch)


TASKS = {"clm": [], "seq2seq": ["model=transformer", "task=seq2seq"]}


@pytest.mark.slow
# DDP with clm's exact match; FSDP2 (every forward a collective) with encoder-decoder
# generation, whose stop decisions are collective too.
@pytest.mark.parametrize("option,task", [("ddp", "clm"), ("fsdp", "seq2seq")])
def test_ranks_share_validation_and_log_the_whole_splits_numbers(option, task, tmp_path):
    alone, [every_row] = validate(tmp_path, "alone", TASKS[task])
    shared, ranks = validate(tmp_path, option, [f"trainer={option}", "trainer.devices=2", *TASKS[task]])
    assert len(every_row) == 14 and len(ranks) == 2
    assert len(ranks[0]) == len(ranks[1]) == 7  # equal shares: collective forwards pair up
    assert {len(batch) for batch in ranks[0] + ranks[1]} == {2, 3}
    assert not rows(ranks[0]) & rows(ranks[1])
    assert rows(ranks[0]) + rows(ranks[1]) == rows(every_row)  # the split, once
    for name in ("val/loss", "val/ppl", "test/loss", "test/ppl"):
        assert shared[name] == pytest.approx(alone[name], rel=1e-5), name
    assert scores(shared) == scores(alone)
    assert 0 < alone["val/acc"] < 1 and len(scores(alone)) > 2  # per-task accuracies / BLEU and chrF
