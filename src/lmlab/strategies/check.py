"""What a trainer config asks for (strategy kind, processes, ZeRO stage) and whether it can run
here, checked before the Trainer is built, any process started or any data read.

Decisions (see README "Scale-out"):
- `trainer=fsdp` needs at least 2 processes: with one there is nothing to shard (use
  `trainer=default|gpu` with the same precision instead). DeepSpeed with one process is kept:
  ZeRO-Offload on a single GPU is a common use.
- On CPU, 16-bit float precisions are refused (no fp16 kernels / DeepSpeed CPU has no fp16),
  and more processes than usable cores are refused (gloo ranks would time-slice one core).
- A string strategy (`+trainer.strategy=fsdp`) is allowed where Lightning runs it; `fsdp` and
  `deepspeed*` strings on CPU point to the `trainer=` options that do run there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError
from lmlab.strategies.warm_ranks import usable_cores

KINDS = ("single", "ddp", "fsdp", "deepspeed")
TARGET_KINDS = {
    "lightning.pytorch.strategies.DDPStrategy": "ddp",
    "lightning.pytorch.strategies.ddp.DDPStrategy": "ddp",
    "lmlab.strategies.fsdp.FSDP2Strategy": "fsdp",
    "lmlab.strategies.deepspeed_cpu.LmlabDeepSpeedStrategy": "deepspeed",
}
CPU_REFUSED_STRINGS = {
    "fsdp": "Lightning's FSDP (FSDP1) strategy refuses CPU; trainer=fsdp runs FSDP2 on CPU and GPU",
    "deepspeed": "Lightning's DeepSpeed strategy refuses CPU; trainer=deepspeed_zero1|2|3 run on CPU and GPU",
}


@dataclass(frozen=True)
class StrategyInfo:
    kind: str                  # single | ddp | fsdp | deepspeed
    accelerator: str           # cpu | gpu
    world_size: int
    zero_stage: int | None = None
    offload: bool = False

    @property
    def shards_parameters(self) -> bool:
        """Each rank holds only a slice of every weight (FSDP2, ZeRO-3)."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def label(self) -> str:
        if self.kind == "deepspeed":
            return f"deepspeed_zero{self.zero_stage}" + ("_offload" if self.offload else "")
        return self.kind


def _accelerator(trainer: DictConfig, here: bool = True) -> str:
    value = str(trainer.get("accelerator", "auto"))
    if value == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if value in ("gpu", "cuda"):
        if here and not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", value, ["cpu", "auto"], "no CUDA GPU on this machine")
        return "gpu"
    return value


def _devices(trainer: DictConfig, accelerator: str) -> int:
    value = trainer.get("devices", 1)
    if value in ("auto", -1):
        return torch.cuda.device_count() if accelerator == "gpu" else 1
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return len(value)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError("trainer.devices", value, reason="a positive number of devices/processes (or auto)")
    return value


def strategy_info(trainer: DictConfig, here: bool = True) -> StrategyInfo:
    """Strategy kind and process count of a `trainer` config (no validation of the rest)."""
    accelerator = _accelerator(trainer, here)
    devices = _devices(trainer, accelerator) * int(trainer.get("num_nodes", 1) or 1)
    strategy = trainer.get("strategy")
    if strategy is None or strategy == "auto":
        return StrategyInfo("ddp" if devices > 1 else "single", accelerator, devices)
    if isinstance(strategy, str):
        kind = next((k for k in ("fsdp", "deepspeed", "ddp") if strategy.startswith(k)), "single")
        if accelerator == "cpu" and kind in CPU_REFUSED_STRINGS:
            raise ConfigError("trainer.strategy", strategy, ["ddp", "auto"], CPU_REFUSED_STRINGS[kind])
        return StrategyInfo(kind, accelerator, devices)
    target = strategy.get("_target_")
    kind = TARGET_KINDS.get(target)
    if kind is None:
        return StrategyInfo("single" if devices == 1 else "ddp", accelerator, devices)
    if kind != "deepspeed":
        return StrategyInfo(kind, accelerator, devices)
    zero = (strategy.get("config") or {}).get("zero_optimization") or {}
    offload = any(((zero.get(k) or {}).get("device") or "none") != "none" for k in ("offload_param", "offload_optimizer"))
    return StrategyInfo(kind, accelerator, devices, zero_stage=zero.get("stage", 0), offload=offload)


def check_trainer(cfg: DictConfig, here: bool = True) -> StrategyInfo:
    """Refuse, naming the field, a trainer config that cannot run here; before any compute.

    `here=False` checks the config for the hardware it names (the compatibility matrix: a
    `trainer=gpu` cell is not refused for this machine having no GPU)."""
    trainer = cfg.trainer
    info = strategy_info(trainer, here)
    precision = str(trainer.get("precision", "32-true"))
    if info.accelerator == "cpu" and here:
        if precision.startswith("16") or precision == "16":
            raise ConfigError("trainer.precision", precision, ["32-true", "bf16-mixed", "bf16-true"],
                              "float16 needs a GPU (CPUs compute in fp32 or bf16)")
        if info.world_size > usable_cores():
            raise ConfigError("trainer.devices", trainer.get("devices"), list(range(1, usable_cores() + 1)),
                              f"{info.world_size} CPU processes on {usable_cores()} usable cores")
    if info.kind == "fsdp" and info.world_size < 2:
        raise ConfigError("trainer.devices", trainer.get("devices"), reason="trainer=fsdp shards over >= 2 "
                          "processes; with one there is nothing to shard (use trainer=default or gpu)")
    if info.kind == "deepspeed" and not isinstance(trainer.get("strategy"), str):
        from lmlab.strategies.deepspeed_config import (
            check_deepspeed_config,
            use_cpu_accelerator_if_no_gpu,
        )

        if trainer.get("gradient_clip_algorithm") == "value":
            raise ConfigError("trainer.gradient_clip_algorithm", "value", ["norm"],
                              "DeepSpeed clips by norm only")
        use_cpu_accelerator_if_no_gpu(info.accelerator)
        # DeepSpeed JIT-compiles its ops (on CPU its shared-memory allreduce, ~25 s) into
        # TORCH_EXTENSIONS_DIR: keep them in the project's cache so later runs reuse them.
        cache_dir = (cfg.get("paths") or {}).get("cache_dir")
        if cache_dir:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cache_dir) / "torch_extensions"))
        check_deepspeed_config(
            _container(trainer.strategy.get("config")),
            micro_batch_size=int(cfg.get("data", {}).get("batch_size", 1) or 1),
            accumulate=int(trainer.get("accumulate_grad_batches", 1) or 1),
            world_size=info.world_size, gradient_clip=trainer.get("gradient_clip_val"),
            precision=precision,
        )
    return info


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def check_run(cfg: DictConfig, here: bool = True) -> StrategyInfo:
    """`check_trainer` plus what the strategy means for the other groups (PEFT methods)."""
    from lmlab.strategies.compat import check_peft_with_strategy

    info = check_trainer(cfg, here)
    peft = cfg.get("peft") or {}
    check_peft_with_strategy(info, str(peft.get("method", "none")))
    return info
