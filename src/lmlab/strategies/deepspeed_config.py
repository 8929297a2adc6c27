"""A DeepSpeed config from `conf/trainer/deepspeed_*.yaml`, checked by DeepSpeed's own config
class before any process starts.

Lightning fills three fields itself when the Trainer sets up (`gradient_accumulation_steps` from
`trainer.accumulate_grad_batches`, `train_micro_batch_size_per_gpu` from the data loader,
`gradient_clipping` from `trainer.gradient_clip_val`, and the precision section). The check
fills them the same way on a copy, so DeepSpeed sees the config it will get at fit time.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from lmlab.errors import ConfigError

FIELD = "trainer.strategy.config"
# Set by Lightning from other trainer fields; a value in the group would be refused at fit.
LIGHTNING_OWNED = {"gradient_accumulation_steps": "trainer.accumulate_grad_batches"}


def use_cpu_accelerator_if_no_gpu(accelerator: str) -> None:
    """DeepSpeed picks its accelerator once, at import: CPU runs must say so before that."""
    import torch

    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def check_deepspeed_config(
    config: dict[str, Any], *, micro_batch_size: int, accumulate: int, world_size: int,
    gradient_clip: float | None, precision: str,
) -> None:
    """Raise ConfigError naming the offending field of the group's DeepSpeed config."""
    if not isinstance(config, dict):
        raise ConfigError(FIELD, config, reason="must be a mapping (DeepSpeed's JSON config)")
    for key, owner in LIGHTNING_OWNED.items():
        if key in config:
            raise ConfigError(f"{FIELD}.{key}", config[key], reason=f"set from {owner}; remove it here")
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{FIELD}.zero_optimization.stage", stage, [0, 1, 2, 3], "ZeRO stage")
    offload_param = (zero.get("offload_param") or {}).get("device", "none")
    if offload_param not in (None, "none") and stage != 3:
        raise ConfigError(f"{FIELD}.zero_optimization.offload_param", zero.get("offload_param"),
                          reason=f"parameter offload needs ZeRO stage 3 (stage is {stage})")
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload_opt not in (None, "none") and stage == 0:
        raise ConfigError(f"{FIELD}.zero_optimization.offload_optimizer", zero.get("offload_optimizer"),
                          reason="optimizer offload needs ZeRO stage 1, 2 or 3")
    full = copy.deepcopy(config)
    full["gradient_accumulation_steps"] = accumulate
    full.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    full.setdefault("gradient_clipping", gradient_clip or 0.0)
    if "train_batch_size" in full:
        expected = full["train_micro_batch_size_per_gpu"] * accumulate * world_size
        if full["train_batch_size"] != expected:
            raise ConfigError(
                f"{FIELD}.train_batch_size", full["train_batch_size"], [expected],
                f"must equal micro batch ({full['train_micro_batch_size_per_gpu']}) x "
                f"trainer.accumulate_grad_batches ({accumulate}) x processes ({world_size}); or leave it out",
            )
        del full["train_batch_size"]  # checked above for the real world size, not DeepSpeed's 1
    if precision.startswith("16") and "fp16" not in full:
        full["fp16"] = {"enabled": True}
    elif precision.startswith("bf16") and "bf16" not in full:
        full["bf16"] = {"enabled": True}
    _validate_with_deepspeed(full)


def _validate_with_deepspeed(config: dict[str, Any]) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(config)
    except ValidationError as err:
        first = err.errors()[0]
        section = {"DeepSpeedZeroConfig": "zero_optimization"}.get(err.title, "")
        loc = ".".join(str(p) for p in first["loc"])
        field = ".".join(p for p in (FIELD, section, loc) if p)
        value = first.get("input")
        raise ConfigError(field, value, reason=f"DeepSpeed: {first['msg']}") from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(FIELD, "...", reason=f"DeepSpeed refuses the config: {err}") from None
