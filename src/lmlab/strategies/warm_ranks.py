"""Starting a multi-process job's other ranks while the main process is still starting.

A rank's Python start (torch, Lightning, transformers, ...) takes 5-10 s, and the main process
started the other ranks only when Lightning's `fit` began, after its own start, data and model:
a 2-process job paid the start twice, one after the other. `start_warm_ranks(cfg)` is called by
`train.py` as soon as Hydra has composed the job, before anything heavy is imported: it starts
the ranks this process will launch (`devices - 1`) as `python -m lmlab.strategies.worker --warm`,
which import lmlab while this process does and then wait on their stdin. `RunConfigLauncher`
hands each one its rank's config, environment and directory (`take_warm_rank`); the same
`train.run` then runs in it as in a rank started afterwards. Whatever is not handed over (a
config error, a strategy that starts no processes, a job skipped as completed) is killed
(`release_warm_ranks`): a waiting rank has done nothing but import.

A waiting rank imports only what reads no job setting at import: `lmlab.train`. DeepSpeed, for
one, fixes its accelerator when imported, from `DS_ACCELERATOR`, which the main process sets
only when it checks the job; a rank imports it after the handoff, with the job's environment.
Until the handoff a waiting rank ignores Ctrl-C (the main process ends it) and dies with the
main process (Linux: it would otherwise hold the job's output pipes until its imports end).

This module imports nothing heavy: `train.py` imports it before torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

WARM_FLAG = "--warm"
# Set when an outside launcher (torchrun, srun, mpirun, LSF) started this process as one rank of
# many: it starts no ranks itself.
EXTERNAL_RANK_ENV = ("LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "LSB_JOBID")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WARM: list[subprocess.Popen] = []

log = logging.getLogger(__name__)


def local_ranks_to_start(trainer_cfg: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """How many other ranks this process's launcher will start, when the config says it plainly:
    `devices - 1` for a device count or list. 0 where another launcher starts the ranks, and for
    `auto`/-1 (the GPU count is not known without initialising CUDA); a wrong guess only costs a
    waiting process that is killed, or a rank started cold."""
    if any(name in environ for name in EXTERNAL_RANK_ENV):
        return 0
    if str(environ.get("SLURM_NTASKS", "1")).strip() not in ("", "1"):
        return 0
    devices = trainer_cfg.get("devices")
    if isinstance(devices, bool):
        return 0
    if isinstance(devices, int):
        count = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, Sequence) and not isinstance(devices, str):  # list, ListConfig
        count = len(devices)
    else:
        return 0
    # More processes than cores is refused for CPU runs before any rank starts, and a GPU
    # node has a core per GPU: a larger count is a typo this must not turn into dozens of
    # interpreters importing torch at once.
    return max(min(count, usable_cores()) - 1, 0)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_warm_ranks(cfg: Mapping[str, Any]) -> int:
    """Start the ranks this job will launch; returns how many were started. Never fails the
    job: what it cannot start, the launcher starts when `fit` begins."""
    release_warm_ranks()  # a previous job of this process's multirun
    try:
        count = local_ranks_to_start(cfg.get("trainer") or {}, os.environ)
    except Exception:  # a broken config: the run reports it, with its field, before any rank starts
        return 0
    command = [sys.executable, "-m", "lmlab.strategies.worker", WARM_FLAG, str(os.getpid())]
    for _ in range(count):
        try:
            _WARM.append(subprocess.Popen(command, stdin=subprocess.PIPE, env=dict(os.environ), cwd=os.getcwd()))
        except OSError as err:  # out of processes or memory now: the launcher tries again at fit
            log.warning("could not start a rank ahead of the job (%s); it starts with fit", err)
            break
    return len(_WARM)


def take_warm_rank(config_path: str, env: Mapping[str, str], cwd: str) -> subprocess.Popen | None:
    """A waiting rank, handed the rank's config, environment and directory; None if none is left."""
    while _WARM:
        proc = _WARM.pop(0)
        if proc.poll() is not None:  # it failed to start (its error is on stderr): start a fresh one
            continue
        handoff = json.dumps({"config": config_path, "env": dict(env), "cwd": cwd}) + "\n"
        try:
            proc.stdin.write(handoff.encode())
            proc.stdin.close()
        except OSError:  # it died since the poll
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.wait()
            continue
        log.info("rank handed to a process started with the job (pid %d)", proc.pid)
        return proc
    return None


def release_warm_ranks() -> None:
    """Kill the ranks no launcher took: they only imported (and would hold this job's output
    pipes open until their imports end)."""
    while _WARM:
        proc = _WARM.pop()
        proc.kill()
        proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig): False where there is none (not Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return False
    return True


def _die_with(parent_pid: int) -> None:
    if not _set_parent_death_signal(signal.SIGKILL):  # end of input still releases it, later
        return
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)


def _outlive_parent() -> None:
    """From the handoff on, a rank like one started at `fit` (RankObserver ends those)."""
    _set_parent_death_signal(0)


def wait_for_rank(parent_pid: int | None = None) -> str | None:
    """In a waiting rank: import, wait for the handoff, and take on the rank's environment.
    Returns the rank's config path, or None when released (end of input)."""
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a rank started later would have
    if parent_pid is not None:
        _die_with(parent_pid)
    started_threads = os.environ.get("OMP_NUM_THREADS")
    import lmlab.train  # noqa: F401  the slow part, while the main process does the same
    line = sys.stdin.readline()
    if not line.strip():
        return None
    handoff = json.loads(line)
    _outlive_parent()
    signal.signal(signal.SIGINT, interrupt)
    os.chdir(handoff["cwd"])
    os.environ.clear()
    os.environ.update(handoff["env"])
    # Read at import, and so from the environment this process started with: what a rank
    # started now would have read from its own.
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads != started_threads and threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    return handoff["config"]
