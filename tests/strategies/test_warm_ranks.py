"""Ranks started with the job (`lmlab.strategies.warm_ranks`): how many, the handoff from the
launcher, what a waiting rank takes on, and release. The 2-process runs in this folder all go
through `train.py`, and so through warm ranks, end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment

from lmlab.strategies import launch, warm_ranks
from tests.conftest import ROOT


@pytest.mark.parametrize("devices,environ,expected", [
    (2, {}, 1),
    (4, {}, 3),
    (1, {}, 0),
    ("3", {}, 2),
    ("0,1", {}, 1),
    ([0, 1, 2], {}, 2),
    (64, {}, 7),  # capped at the usable cores (8 here): a typo must not start 63 interpreters
    ("auto", {}, 0),  # the GPU count: unknown before CUDA starts
    (-1, {}, 0),
    (True, {}, 0),
    (None, {}, 0),
    (2, {"LOCAL_RANK": "1"}, 0),  # torchrun and co started this process as one of the ranks
    (2, {"TORCHELASTIC_RUN_ID": "x"}, 0),
    (2, {"SLURM_NTASKS": "2"}, 0),  # srun starts the ranks
    (2, {"SLURM_NTASKS": "1"}, 1),
])
def test_ranks_to_start_follow_the_device_count_unless_another_launcher_starts_them(devices, environ, expected,
                                                                                    monkeypatch):
    monkeypatch.setattr(warm_ranks, "usable_cores", lambda: 8)
    assert warm_ranks.local_ranks_to_start({"devices": devices}, environ) == expected


def test_importing_the_module_imports_no_torch():
    # train.py imports it to start the ranks before its own heavy imports.
    code = "import sys, lmlab.strategies.warm_ranks, lmlab.strategies; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


class KeptBytes(io.BytesIO):
    def close(self) -> None:  # the handoff stays readable
        pass


class FakeRank:
    def __init__(self, alive: bool = True):
        self.stdin = KeptBytes()
        self.alive = alive
        self.pid = 12345

    def poll(self):
        return None if self.alive else 1

    def wait(self, timeout=None):
        return 0

    def kill(self):
        self.alive = False


def _launch_two_ranks(monkeypatch, tmp_path, warm: list) -> tuple[launch.RunConfigLauncher, list, dict]:
    monkeypatch.setattr(warm_ranks, "_WARM", warm)
    monkeypatch.setattr(launch, "_LAUNCHED", [])
    cold: list[tuple[list[str], dict]] = []

    def popen(command, env, cwd):
        cold.append((command, env))
        return FakeRank()

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    for name in launch.RANK_ENV:  # set by the launcher; restored (removed) after the test, whatever happens
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    launcher = launch.RunConfigLauncher(tmp_path / "rank.yaml", cluster_environment=LightningEnvironment(),
                                        num_processes=2, num_nodes=1)
    launcher._call_children_scripts()
    handoff_env = dict(os.environ)
    launcher.finish()
    return launcher, cold, handoff_env


def test_the_launcher_hands_its_rank_to_a_waiting_process(monkeypatch, tmp_path):
    waiting, spare = FakeRank(), FakeRank()
    launcher, cold, launcher_env = _launch_two_ranks(monkeypatch, tmp_path, [waiting, spare])
    assert cold == []
    handoff = json.loads(waiting.stdin.getvalue())
    assert handoff["config"] == str(tmp_path / "rank.yaml") and handoff["cwd"] == os.getcwd()
    assert handoff["env"]["LOCAL_RANK"] == "1" and handoff["env"]["WORLD_SIZE"] == "2"
    assert handoff["env"]["MASTER_PORT"] == launcher_env["MASTER_PORT"]
    assert warm_ranks._WARM == [] and not spare.alive  # not needed: released


def test_a_waiting_process_that_died_is_passed_over(monkeypatch, tmp_path):
    dead, live = FakeRank(alive=False), FakeRank()  # failed while importing: its error is on stderr
    launcher, cold, _ = _launch_two_ranks(monkeypatch, tmp_path, [dead, live])
    assert cold == [] and dead.stdin.getvalue() == b""
    assert json.loads(live.stdin.getvalue())["env"]["LOCAL_RANK"] == "1"


def test_without_a_waiting_process_the_rank_starts_cold(monkeypatch, tmp_path):
    dead = FakeRank(alive=False)
    launcher, cold, _ = _launch_two_ranks(monkeypatch, tmp_path, [dead])
    assert dead.stdin.getvalue() == b""
    [(command, env)] = cold
    assert command == [sys.executable, "-m", "lmlab.strategies.worker", str(tmp_path / "rank.yaml")]
    assert env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "2"


RECEIVER = """
import json, os, signal, sys
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lmlab.strategies.warm_ranks import wait_for_rank
inherited = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background job
config = wait_for_rank(int(sys.argv[1]))
print(json.dumps({"config": config, "cwd": os.getcwd(), "env": os.environ.get("LMLAB_TEST_VALUE"),
                  "rank": rank_zero_only.rank, "stale": "LMLAB_STALE" in os.environ,
                  "deepspeed": "deepspeed" in sys.modules,
                  "ctrl_c": signal.getsignal(signal.SIGINT) is inherited}))
"""


def test_a_waiting_process_takes_on_the_ranks_directory_environment_and_rank(tmp_path):
    env = {**os.environ, "LMLAB_TEST_VALUE": "handed", "LOCAL_RANK": "1"}
    handoff = json.dumps({"config": "rank.yaml", "env": env, "cwd": str(tmp_path)}) + "\n"
    proc = subprocess.run([sys.executable, "-c", RECEIVER, str(os.getpid())], cwd=ROOT, input=handoff,
                          capture_output=True, text=True, env={**os.environ, "LMLAB_STALE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {
        "config": "rank.yaml", "cwd": str(tmp_path), "env": "handed", "rank": 1, "stale": False,
        # DeepSpeed fixes its accelerator at import (DS_ACCELERATOR): imported after the handoff.
        "deepspeed": False,
        "ctrl_c": True,  # ignored while waiting (the main process ends a waiting rank), inherited after
    }


def test_a_released_process_exits_quietly(monkeypatch):
    # End of input while it imports or waits: the job needed no rank from it.
    proc = subprocess.run([sys.executable, "-m", "lmlab.strategies.worker", warm_ranks.WARM_FLAG, str(os.getpid())], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and "Traceback" not in proc.stderr
    # release_warm_ranks kills the ones a job did not take, at once.
    monkeypatch.setattr(warm_ranks, "_WARM", [])
    for name in (*warm_ranks.EXTERNAL_RANK_ENV, "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(warm_ranks, "usable_cores", lambda: 8)
    try:
        assert warm_ranks.start_warm_ranks({"trainer": {"devices": 3}}) == 2
        procs = list(warm_ranks._WARM)
    finally:
        warm_ranks.release_warm_ranks()
    assert warm_ranks._WARM == [] and all(p.returncode is not None for p in procs)
