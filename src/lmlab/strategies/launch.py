"""Starting the other ranks of a multi-process run on this machine.

Lightning's subprocess launcher re-runs the command line (`sys.argv`): under Hydra it appends
`hydra.run.dir=<run.dir>`, which in a multirun is the wrong directory (the `-m` sweep would even
be started again by every child), and under pytest or a notebook it re-runs the wrong program.
Here the main process writes the fully resolved config of this job into the run directory and
the other ranks run exactly that config (`python -m lmlab.strategies.worker <file>`): one run
directory, one record (written by rank zero), whatever started the job. Processes created by
an outside launcher (torchrun, srun) are left alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from lmlab.strategies.warm_ranks import release_warm_ranks, take_warm_rank

RANK_CONFIG = ".rank_config.yaml"
# What the launcher sets in this process's environment for the job's ranks to find each other.
RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Launchers whose ranks this process started and has not finished yet (see finish_launched_ranks).
_LAUNCHED: list[RunConfigLauncher] = []
# How long a failed rank's job is left to fail in this process on its own before it is killed.
FAILED_RANK_GRACE_S = 60.0

log = logging.getLogger(__name__)


class RunConfigLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with the children's command replaced."""

    def __init__(self, config_path: Path, **kwargs):
        super().__init__(**kwargs)
        self.config_path = config_path
        # Called with the reason before RankObserver kills a hung job (the run's record).
        self.on_abandon: Callable[[str], None] | None = None

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.saved_env = {name: os.environ.get(name) for name in RANK_ENV}
        _LAUNCHED.append(self)
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        command = [sys.executable, "-m", "lmlab.strategies.worker", str(self.config_path)]
        for local_rank in range(1, self.num_processes):
            env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            proc = take_warm_rank(str(self.config_path), env, os.getcwd())
            if proc is None:
                proc = subprocess.Popen(command, env=env, cwd=os.getcwd())
            self.procs.append(proc)
        release_warm_ranks()  # started for more ranks than the job has

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        """Lightning's launch with `RankObserver` in place of its process observer."""
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        # Lightning launches again for each `trainer.validate`/`test` after `fit`; by then the
        # environment names this process's rank, and the children started at `fit` serve those.
        if not self.cluster_environment.creates_processes_externally:
            self.finishing = threading.Event()
            self._call_children_scripts()
            RankObserver(self.procs, self.finishing, self.on_abandon).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def finish(self, timeout: float = 300.0) -> None:
        """End the job's ranks: wait for the children (killing any still there after
        `timeout`), end this process's process group and restore the environment."""
        if getattr(self, "finishing", None) is not None:
            self.finishing.set()  # this process is ending the job itself: no observer's kill
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RankObserver(threading.Thread):
    """Ends a job whose other rank failed while this process (rank zero) hangs.

    Lightning's observer SIGKILLs this process within 5 s of a child's non-zero exit. The
    child usually failed at the same point as rank zero (the same error on every rank, or a
    peer's lost connection), and rank zero was still writing its run record, printing its error
    and ending the job: a 2-process run ended killed with rank zero's error unprinted, and in a
    Hydra multirun the kill ended the whole sweep, whose later jobs never ran. This one leaves
    rank zero `FAILED_RANK_GRACE_S` to end the job itself (`finish_launched_ranks`, which sets
    `finishing`) and kills it only if it has not: e.g. blocked in an NCCL collective for the
    lost rank. `on_abandon(reason)` (the run's record, see `train.run`) is called before the
    kill.
    """

    def __init__(self, procs: list[subprocess.Popen], finishing: threading.Event,
                 on_abandon: Callable[[str], None] | None = None, poll_s: float = 1.0):
        super().__init__(daemon=True, name="lmlab-rank-observer")
        self.procs, self.finishing, self.on_abandon, self.poll_s = procs, finishing, on_abandon, poll_s
        self.main_pid = os.getpid()

    def run(self) -> None:
        failed_at = None
        while not self.finishing.wait(self.poll_s):
            codes = [proc.poll() for proc in list(self.procs)]
            if all(code == 0 for code in codes):  # done, or the job was ended (no procs left)
                return
            if failed_at is None and any(codes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
                rank, code = next((i + 1, c) for i, c in enumerate(codes) if c)
                reason = (f"rank {rank} exited with code {code} and rank zero had not ended the job "
                          f"{FAILED_RANK_GRACE_S:.0f} s later: the job's processes were killed")
                if self.finishing.is_set():  # rank zero got there meanwhile
                    return
                log.error(reason)
                if self.on_abandon is not None:
                    try:
                        self.on_abandon(reason)
                    except Exception:  # the kill must happen whatever the record's fate
                        log.exception("could not record the abandoned job")
                if self.finishing.is_set():  # rank zero got there meanwhile
                    return
                for proc in self.procs:
                    proc.kill()
                os.kill(self.main_pid, signal.SIGKILL)
                return


def stop_observing_ranks() -> None:
    """Rank zero is past the job's collectives and ends the run itself (recording it, then
    `finish_launched_ranks`): however long that takes, no observer kills it from here on."""
    for launcher in _LAUNCHED:
        finishing = getattr(launcher, "finishing", None)
        if finishing is not None:
            finishing.set()


def finish_launched_ranks(grace_s: float = 300.0) -> None:
    """After a job whose other ranks this process started. The environment the launcher set
    (LOCAL_RANK, MASTER_PORT, ...) and the live process group would otherwise carry over to
    the next job of a multirun in this process (Hydra's default launcher runs the jobs one
    after another in one process): that job would take its ranks for externally started ones,
    start none, and wait in its first collective for the last job's exited children."""
    while _LAUNCHED:
        _LAUNCHED.pop().finish(grace_s)


def use_run_config_launcher(trainer: L.Trainer, cfg: DictConfig, overrides: list[str], ckpt_path: str | None) -> None:
    """Swap in RunConfigLauncher when this process would start the other ranks itself."""
    launcher = getattr(trainer.strategy, "_launcher", None)
    if type(launcher) is not _SubprocessScriptLauncher or launcher.cluster_environment.creates_processes_externally:
        release_warm_ranks()  # this job's ranks are not started by this process
        return
    path = Path(cfg.paths.output_dir) / RANK_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    resolved.overrides = list(overrides)
    resolved.print_config = False
    resolved.ckpt_path = ckpt_path  # the checkpoint rank zero chose, not a fresh search
    OmegaConf.save(resolved, path)
    trainer.strategy._launcher = RunConfigLauncher(
        path, cluster_environment=launcher.cluster_environment, num_processes=launcher.num_processes,
        num_nodes=launcher.num_nodes,
    )
