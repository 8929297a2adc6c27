"""SIGTERM reaching a rank of a real 2-process DDP run (CPU, gloo) at the worst moment: between
its forward and the gradient all-reduce. Rank 1 alone, or rank 0, which forwards the signal to
the rank it started (so that one gets it at another moment). Lightning's own handling called a
broadcast from inside the signal handler there, and the job hung with nothing saved (both cases
timed out before `lmlab.strategies.preemption`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from lmlab.record import read_record
from tests.conftest import ROOT
from tests.strategies.test_multiprocess import TINY, env


def _train(run_dir, option: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"trainer={option}", "trainer.devices=2", *TINY,
         "trainer.max_steps=8", "callbacks.last_checkpoint.every_n_steps=null",
         f"hydra.run.dir={run_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}", *extra],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)


@pytest.mark.slow
# fsdp: the save itself is collective (every rank writes its shards of the folder checkpoint).
@pytest.mark.parametrize("option,rank", [("ddp", 1), ("ddp", 0), ("fsdp", 1)])
def test_sigterm_on_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(option, rank, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, option, "+callbacks.sig._target_=tests.strategies.signal_ranks.SigtermAt",
                  "+callbacks.sig.step=3", f"+callbacks.sig.rank={rank}")
    assert proc.returncode == 143, proc.stderr[-4000:]
    record = read_record(run_dir)
    # The signal landed in the 4th step; that step's exchange carries it, the 5th reads it.
    assert record["status"] == "preempted" and record["step"] == 5
    # Each rank says where it stopped (rank 1 logs to the streams it inherited).
    stops = re.findall(r"SIGTERM: saved \S+ at step (\d+)", proc.stdout + proc.stderr)
    assert stops == ["5", "5"], proc.stderr[-4000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    if option == "ddp":
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5
    else:
        assert last.is_dir()
    if rank == 0:
        return
    # Rerunning the same command resumes from that checkpoint and finishes the run.
    proc = _train(run_dir, option)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = read_record(run_dir)
    assert record["status"] == "completed" and record["step"] == 8
    assert record["resumed_from"].endswith("last.ckpt")
