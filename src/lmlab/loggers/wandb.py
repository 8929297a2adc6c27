"""W&B that never needs an account and never waits on the network.

With a login (WANDB_API_KEY or a ~/.netrc entry) it logs online; without one it logs offline
into the run directory and says how to upload later with `wandb sync`.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lmlab.errors import ConfigError

# lmlab's own logger: runs switch off the propagation of Lightning's, which would hide this.
log = logging.getLogger("lmlab")

MODES = ("auto", "online", "offline", "disabled")


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def sweep_group_and_tags() -> tuple[str | None, list[str]]:
    """Inside a Hydra multirun: the sweep's directory as the W&B group (so its jobs sit together
    in the dashboard) and the job's overrides as tags."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None, []
        hc = HydraConfig.get()
        overrides = [str(o) for o in hc.overrides.task]
        if str(hc.mode) != "RunMode.MULTIRUN":
            return None, overrides
        return Path(hc.sweep.dir).as_posix().replace("/", "_").strip("_")[-128:], overrides
    except (ImportError, ValueError, AttributeError):
        return None, []


def build_wandb_logger(
    save_dir: str,
    project: str = "lmlab",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    log_model: bool = False,
    init_timeout_s: float = 30.0,
) -> WandbLogger:
    if mode not in MODES:
        raise ConfigError("logger.wandb.mode", mode, MODES)
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    sweep_group, override_tags = sweep_group_and_tags()
    group = group or sweep_group
    tags = [*(tags or []), *override_tags][:64]  # W&B caps the number of tags
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode == "offline" and rank_zero_only.rank == 0:
        log.info(
            f"W&B: no login found, logging offline to {save_dir}/wandb. "
            f"Upload later with: wandb sync {save_dir}/wandb/offline-run-*"
        )
    extra: dict[str, Any] = {}
    try:
        import wandb

        extra["settings"] = wandb.Settings(init_timeout=init_timeout_s, silent=True)
    except (ImportError, TypeError):
        pass
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        entity=entity,
        name=name,
        group=group,
        tags=[t[:64] for t in tags],  # W&B caps a tag at 64 characters
        offline=mode == "offline",
        mode=mode,
        log_model=log_model,
        **extra,
    )


def finish_wandb_runs(loggers: list[Any], exit_code: int = 0) -> None:
    """Close W&B runs so the next run in this process (a test, a sweep job) starts a new one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=exit_code)
