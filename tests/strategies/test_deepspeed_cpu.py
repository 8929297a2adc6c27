"""Why `LmlabDeepSpeedStrategy` exists: Lightning's DeepSpeed strategy refuses CPU processes in
`setup_environment`, before DeepSpeed is asked; the subclass lifts exactly that check on CPU and
leaves every method to Lightning on GPU. (Real 2-process ZeRO-2/3 trainings on CPU:
test_multiprocess.py.)"""

from __future__ import annotations

import pytest
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy

from lmlab.strategies.deepspeed_cpu import LmlabDeepSpeedStrategy

CONFIG = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


def test_lightning_refuses_cpu():
    strategy = DeepSpeedStrategy(config=dict(CONFIG))
    strategy.accelerator = CPUAccelerator()
    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs"):
        strategy.setup_environment()


def test_subclass_changes_only_the_cpu_path():
    strategy = LmlabDeepSpeedStrategy(config=dict(CONFIG))
    strategy.accelerator = CPUAccelerator()
    assert strategy._on_cpu and strategy._get_process_group_backend() == "gloo"
    assert strategy._device_args().device_rank == 0  # DeepSpeed compares it with 0; None fails
    assert strategy.config == CONFIG
    overridden = {"setup_environment", "setup_distributed", "_get_process_group_backend",
                  "_setup_model_and_optimizer", "_initialize_deepspeed_inference"}
    own = {name for name, value in vars(LmlabDeepSpeedStrategy).items() if callable(value) and not name.startswith("__")}
    assert own - {"_device_args"} == overridden
