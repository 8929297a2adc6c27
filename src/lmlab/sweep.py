"""Re-runnable sweeps: one directory per sweep command, and jobs that know they are done.

`hydra.sweep.dir` is `outputs/multirun/<readable overrides>_<hash>` (resolver `lmlab.sweep_name`),
a function of the sweep's command-line overrides only (not of the time, the launcher or
`hydra.*` settings), so running the same `-m` command again lands in the same directories:
`main()` skips a job whose record says `completed` (returning its objective to the sweeper) and a
failed, preempted or killed one resumes from its `last.ckpt`. A fresh sweep of the same command:
`hydra.sweep.dir=<another dir>`, or move the old directory away.

This module is imported by `train.py` before Hydra composes anything, so it must stay light
(no torch).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError

SWEEP_NAME_RESOLVER = "lmlab.sweep_name"
DIRECTION_RESOLVER = "lmlab.direction"
READABLE_CHARS = 60  # of the overrides in the directory name; the hash tells sweeps apart
# Metrics where higher is better; anything else (loss, ppl, bits, error) is minimised.
MAXIMIZED = ("acc", "accuracy", "bleu", "chrf", "f1", "precision", "recall", "tokens_per_sec", "mfu")


def sweep_name(overrides: list[str] | tuple[str, ...]) -> str:
    """`model=gpt,gqa debug=fast` → `debug=fast_model=gpt,gqa_<8 hex>`; order does not matter."""
    items = sorted(str(o) for o in overrides)
    digest = hashlib.sha1("\n".join(items).encode()).hexdigest()[:8]
    # What the sweep varies reads first, then group choices, then fields; where outputs go is
    # no part of the name.
    shown = sorted((o for o in items if not o.startswith("paths.")),
                   key=lambda o: (not _sweeps(o), "." in o.partition("=")[0]))
    readable = re.sub(r"[^\w=,.+~-]+", "-", "_".join(shown)).strip("-_")[:READABLE_CHARS] or "default"
    return f"{readable}_{digest}"


_command_overrides: list[str] | None = None


class SweepNameCallback(Callback):
    """Hydra callback (conf/hydra/default.yaml): keeps the command line's overrides of a multirun
    before anything resolves `hydra.sweep.dir`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _command_overrides
        _command_overrides = [str(o) for o in config.hydra.overrides.task]


def _sweeps(override: str) -> bool:
    key, _, value = override.partition("=")
    return key == "hparams_search" or "," in value or value.startswith(("range(", "choice(", "interval(", "glob("))


def _sweep_name_resolver() -> str:
    # Resolved once, in the sweep's main process. The resolver is cached and Hydra copies
    # resolver caches into each job's config (the way ${now:} stays one time), so every job, also
    # one that runs in a SLURM process of its own, sees the same value.
    return sweep_name(_command_overrides or [])


def direction(metric: str) -> str:
    """Optuna direction for a metric name: `val/acc` → maximize, `val/loss` → minimize."""
    leaf = str(metric).split("/")[-1].split("@")[0].lower()
    return "maximize" if leaf in MAXIMIZED else "minimize"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver(SWEEP_NAME_RESOLVER):
        OmegaConf.register_new_resolver(SWEEP_NAME_RESOLVER, _sweep_name_resolver, use_cache=True)
    if not OmegaConf.has_resolver(DIRECTION_RESOLVER):
        OmegaConf.register_new_resolver(DIRECTION_RESOLVER, direction)


def previous_record(output_dir: str | Path, overrides: list[str]) -> dict[str, Any] | None:
    """The record an earlier run of this same job left in its directory, if any.

    A record of *other* overrides means two different jobs map to one directory (e.g. a
    hand-set hydra.sweep.dir reused for another grid); resuming would mix them, so it is refused.
    """
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn record: treat the job as unfinished
    theirs = sorted(record.get("overrides", []))
    if theirs != sorted(overrides):
        raise ConfigError(
            "hydra.sweep.dir", str(Path(output_dir).parent),
            reason=f"{output_dir} holds the record of another job (overrides {theirs}, this job "
            f"{sorted(overrides)}); give this sweep its own hydra.sweep.dir or move the old one away",
        )
    return record


register_resolvers()
