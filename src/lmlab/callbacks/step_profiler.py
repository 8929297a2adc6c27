"""Where a run's training steps spend their time: `torch.profiler` over a few steps of the real
run (Lightning loop, callbacks, data loading and all), as a table of ops and kernels.
The bare-loop counterpart is bench/profile_step.py; the two side by side show what the loop adds.

Off by default; add it to any run with
`+callbacks.step_profiler._target_=lmlab.callbacks.StepProfiler` (and `+callbacks.step_profiler.
start_step=...`). It writes `<run dir>/step_profile.txt`: the top ops by device time (CUDA
kernels on a GPU, CPU ops otherwise) and by host time, and the profiled steps' wall time;
with several processes, rank N > 0 writes `step_profile.rankN.txt`.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

from lmlab.errors import ConfigError


def _run_dir(trainer: L.Trainer) -> str:
    """The Hydra run directory of a `train.py` run, else the trainer's root directory."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    return trainer.default_root_dir


class StepProfiler(L.Callback):
    """Profile training steps `start_step` .. `start_step + steps - 1` (optimizer steps, after
    compilation and warm-up) and write the tables to `<run dir>/step_profile.txt`."""

    def __init__(self, start_step: int = 20, steps: int = 3, row_limit: int = 25,
                 filename: str = "step_profile.txt", dirpath: str | None = None):
        for name, value, low in (("start_step", start_step, 0), ("steps", steps, 1),
                                 ("row_limit", row_limit, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"callbacks.step_profiler.{name}", value, f"an integer >= {low}")
        self.start_step = start_step
        self.steps = steps
        self.row_limit = row_limit
        self.filename = filename
        self.dirpath = dirpath
        self._profile: profile | None = None
        self._started = 0.0
        self.path: Path | None = None

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._profile is None and self.path is None and trainer.global_step >= self.start_step:
            activities = [ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._sync(pl_module)
            self._profile = profile(activities=activities)
            self._profile.__enter__()
            self._first_step = trainer.global_step
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profile is not None and trainer.global_step >= self._first_step + self.steps:
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profile is not None:
            self._finish(trainer, pl_module)

    def _finish(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._started
        prof, self._profile = self._profile, None
        prof.__exit__(None, None, None)
        steps = trainer.global_step - self._first_step
        averages = prof.key_averages()
        device_key = "cuda_time_total" if pl_module.device.type == "cuda" else "self_cpu_time_total"
        text = [f"steps {self._first_step}..{trainer.global_step - 1}: {steps} step(s) in "
                f"{seconds:.3f} s ({seconds / max(steps, 1) * 1e3:.1f} ms/step, profiler overhead "
                "included)",
                f"\n## by {'device' if device_key.startswith('cuda') else 'host'} time\n",
                averages.table(sort_by=device_key, row_limit=self.row_limit,
                               max_name_column_width=80)]
        if device_key.startswith("cuda"):
            text += ["\n## by host time\n",
                     averages.table(sort_by="self_cpu_time_total", row_limit=self.row_limit,
                                    max_name_column_width=80)]
        # Every rank profiles its own steps; each keeps its own file (rank 0's has the plain name).
        name = Path(self.filename)
        if trainer.global_rank:
            name = name.with_name(f"{name.stem}.rank{trainer.global_rank}{name.suffix}")
        self.path = Path(self.dirpath or _run_dir(trainer)) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(text) + "\n")
