"""RankObserver: a failed rank's job is left to rank zero to end, and killed only if rank zero
has not ended it after the grace period (here a stand-in process plays rank zero)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from lmlab.strategies import launch


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _observe(children: list[subprocess.Popen], main: subprocess.Popen) -> tuple[launch.RankObserver, threading.Event]:
    finishing = threading.Event()
    observer = launch.RankObserver(children, finishing, poll_s=0.05)
    observer.main_pid = main.pid
    observer.start()
    return observer, finishing


@pytest.fixture
def short_grace(monkeypatch):
    monkeypatch.setattr(launch, "FAILED_RANK_GRACE_S", 0.5)


def test_a_hung_job_is_killed_after_the_grace_period(short_grace):
    main, hung = _sleeper(), _sleeper()
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    observer, _ = _observe([failed, hung], main)
    observer.join(timeout=60)
    assert not observer.is_alive()
    assert main.wait(timeout=30) < 0 and hung.wait(timeout=30) < 0  # killed


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


def test_a_job_whose_ranks_all_succeed_ends_the_observer():
    main = _sleeper()
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    observer, _ = _observe([done], main)
    observer.join(timeout=60)
    assert not observer.is_alive() and main.poll() is None
    main.kill()
