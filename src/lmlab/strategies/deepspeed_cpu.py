"""Lightning's DeepSpeedStrategy, also on CPU processes.

Lightning refuses anything but CUDA in `DeepSpeedStrategy.setup_environment` ("The DeepSpeed
strategy is only supported on CUDA GPUs"), `setup_distributed` insists that device indices
equal local ranks, and `deepspeed.initialize` is handed `device_rank=root_device.index`, which
is None for a CPU device (DeepSpeed then fails comparing None >= 0). DeepSpeed itself runs ZeRO-1/2/3 on CPU with its
CPU accelerator (`DS_ACCELERATOR=cpu`) and the gloo backend. This subclass lifts exactly those
CUDA-only assumptions when the accelerator is the CPU; on a GPU every method is Lightning's own, so GPU
runs take the same code path as `strategy="deepspeed"`.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


class LmlabDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy(config=...)` whose config comes from the `trainer` group."""

    strategy_name = "lmlab_deepspeed"

    def __init__(self, config: dict[str, Any], **kwargs: Any):
        super().__init__(config=config, **kwargs)

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu:
            return super().setup_environment()
        # DeepSpeedStrategy.setup_environment = the CUDA check + DDPStrategy's; skip the check.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # As Lightning's, minus the device-index check (CPU devices carry no index).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or ("gloo" if self._on_cpu else super()._get_process_group_backend())

    def _device_args(self) -> argparse.Namespace:
        # DeepSpeed's CPU accelerator ignores the index; it only has to be a rank, not None.
        return argparse.Namespace(device_rank=self.local_rank)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._device_args(), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        if not self._on_cpu:
            return super()._initialize_deepspeed_inference(model)
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        # Lightning's method with the CPU device argument; the config subset is Lightning's.
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=self._device_args(), config=config, model=model, optimizer=None, lr_scheduler=None,
            model_parameters=[], dist_init_required=False,
        )
