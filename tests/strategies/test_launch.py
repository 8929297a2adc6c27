"""RankObserver: a failed rank's job is left to rank zero to end, and killed only if rank zero
has not ended it after the grace period (here a stand-in process plays rank zero)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from lmlab.strategies import launch
from tests.conftest import ROOT


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _observe(children: list[subprocess.Popen], main: subprocess.Popen,
             on_abandon=None) -> tuple[launch.RankObserver, threading.Event]:
    finishing = threading.Event()
    observer = launch.RankObserver(children, finishing, on_abandon, poll_s=0.05)
    observer.main_pid = main.pid
    observer.start()
    return observer, finishing


@pytest.fixture
def short_grace(monkeypatch):
    monkeypatch.setattr(launch, "FAILED_RANK_GRACE_S", 0.5)


def test_a_hung_job_is_killed_after_the_grace_period(short_grace):
    main, hung = _sleeper(), _sleeper()
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    reasons: list[str] = []
    observer, _ = _observe([failed, hung], main, reasons.append)
    observer.join(timeout=60)
    assert not observer.is_alive()
    assert main.wait(timeout=30) < 0 and hung.wait(timeout=30) < 0  # killed
    assert reasons == ["rank 1 exited with code 3 and rank zero had not ended the job 0 s later: "
                       "the job's processes were killed"]  # the run's record says so first


def test_rank_zero_ending_the_job_itself_is_not_killed(monkeypatch):
    monkeypatch.setattr(launch, "FAILED_RANK_GRACE_S", 30.0)
    main = _sleeper()
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    observer, finishing = _observe([failed], main)
    failed.wait()
    finishing.set()  # what finish_launched_ranks does
    observer.join(timeout=60)
    assert not observer.is_alive() and main.poll() is None
    main.kill()


def test_rank_zero_past_its_collectives_is_not_killed(monkeypatch):
    # train.run calls stop_observing_ranks as soon as it is failing (or done) on its own: the
    # record writing, W&B upload and finish_launched_ranks after it may take any time.
    monkeypatch.setattr(launch, "FAILED_RANK_GRACE_S", 0.5)
    main = _sleeper()
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    observer, finishing = _observe([failed], main)
    launcher = type("Launcher", (), {"finishing": finishing})()
    monkeypatch.setattr(launch, "_LAUNCHED", [launcher])
    launch.stop_observing_ranks()
    failed.wait()
    observer.join(timeout=60)
    assert not observer.is_alive() and main.poll() is None
    main.kill()


def test_a_job_whose_ranks_all_succeed_ends_the_observer():
    main = _sleeper()
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    observer, _ = _observe([done], main)
    observer.join(timeout=60)
    assert not observer.is_alive() and main.poll() is None
    main.kill()


@pytest.mark.slow
def test_a_run_killed_for_a_lost_rank_is_recorded_as_failed(tmp_path):
    # Rank 1 fails at step 2; rank zero stays busy (60 s) past a 3 s grace, as one blocked in a
    # collective would: the observer kills the job, after writing the run's record.
    from lmlab.record import read_record
    from tests.strategies.test_multiprocess import TINY, env

    run_dir = tmp_path / "run"
    args = ["train.py", "trainer=ddp", "trainer.devices=2", *TINY,
            "+callbacks.fail._target_=tests.strategies.failing_ranks.FailOnEveryRank", "+callbacks.fail.step=2",
            "+callbacks.fail.rank_zero_delay_s=60", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    script = ("import runpy, sys; import lmlab.strategies.launch as launch; launch.FAILED_RANK_GRACE_S = 3; "
              f"sys.argv = {args!r}; runpy.run_path('train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-4000:]
    record = read_record(run_dir)
    assert record["status"] == "failed"
    assert record["error"].startswith("RankFailure: rank 1 exited with code 1"), record["error"]
