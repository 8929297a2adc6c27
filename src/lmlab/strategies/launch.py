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

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

RANK_CONFIG = ".rank_config.yaml"


class RunConfigLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with the children's command replaced."""

    def __init__(self, config_path: Path, **kwargs):
        super().__init__(**kwargs)
        self.config_path = config_path

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        command = [sys.executable, "-m", "lmlab.strategies.worker", str(self.config_path)]
        for local_rank in range(1, self.num_processes):
            env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=env, cwd=os.getcwd()))


def use_run_config_launcher(trainer: L.Trainer, cfg: DictConfig, overrides: list[str], ckpt_path: str | None) -> None:
    """Swap in RunConfigLauncher when this process would start the other ranks itself."""
    launcher = getattr(trainer.strategy, "_launcher", None)
    if type(launcher) is not _SubprocessScriptLauncher or launcher.cluster_environment.creates_processes_externally:
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
