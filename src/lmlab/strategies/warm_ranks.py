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

This module imports nothing heavy: `train.py` imports it before torch.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

WARM_FLAG = "--warm"
# Set when an outside launcher (torchrun, srun, mpirun, LSF) started this process as one rank of
# many: it starts no ranks itself.
EXTERNAL_RANK_ENV = ("LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "LSB_JOBID")
# Imported by a waiting rank: what every rank's run imports first (lmlab.train), and DeepSpeed,
# the slowest of the strategies' own imports, when the job's strategy is one of its.
RUN_MODULE = "lmlab.train"
_WARM: list[subprocess.Popen] = []


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
    elif isinstance(devices, (list, tuple)) or type(devices).__name__ == "ListConfig":
        count = len(devices)
    else:
        return 0
    return max(count - 1, 0)


def warm_imports(trainer_cfg: Mapping[str, Any]) -> list[str]:
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    return ["deepspeed"] if "deepspeed" in target.lower() else []


def start_warm_ranks(cfg: Mapping[str, Any]) -> int:
    """Start the ranks this job will launch; returns how many were started."""
    release_warm_ranks()  # a previous job of this process's multirun
    try:
        trainer_cfg = cfg.get("trainer") or {}
        count = local_ranks_to_start(trainer_cfg, os.environ)
        extra = warm_imports(trainer_cfg) if count else []
    except Exception:  # a broken config: the run reports it, with its field, before any rank starts
        return 0
    command = [sys.executable, "-m", "lmlab.strategies.worker", WARM_FLAG, *extra]
    for _ in range(count):
        _WARM.append(subprocess.Popen(command, stdin=subprocess.PIPE, env=dict(os.environ), cwd=os.getcwd()))
    return count


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
            proc.wait()
            continue
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
            proc.stdin.close()


def wait_for_rank(modules: list[str]) -> str | None:
    """In a waiting rank: import, wait for the handoff, and take on the rank's environment.
    Returns the rank's config path, or None when released (end of input)."""
    started_threads = os.environ.get("OMP_NUM_THREADS")
    for name in [RUN_MODULE, *modules]:
        importlib.import_module(name)
    line = sys.stdin.readline()
    if not line.strip():
        return None
    handoff = json.loads(line)
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
