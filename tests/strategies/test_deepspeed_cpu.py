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


# (trainer option + overrides, precision, guard policy): ZeRO keeps gradients out of `p.grad`,
# so the guard reads DeepSpeed's own verdict; before, such runs skipped poisoned steps silently
# forever. Stage 0 in fp32 runs the plain torch optimizer (no DeepSpeed check, `p.grad` set):
# there the guard's own check must stay.
GUARDED = [("deepspeed_zero1", "32-true", "stop"), ("deepspeed_zero2", "bf16-mixed", "skip"),
           ("deepspeed_zero3", "32-true", "stop"),
           ("deepspeed_zero1 trainer.strategy.config.zero_optimization.stage=0", "32-true", "stop"),
           ("deepspeed_zero1 trainer.strategy.config.zero_optimization.stage=0", "32-true", "skip")]


@pytest.mark.slow
@pytest.mark.parametrize("option,precision,policy", GUARDED,
                         ids=["zero1", "zero2-bf16-skip", "zero3", "stage0", "stage0-skip"])
def test_nonfinite_guard_acts_on_the_steps_deepspeed_skips(option, precision, policy, tmp_path):
    import subprocess
    import sys

    from lmlab.record import read_record
    from tests.conftest import ROOT
    from tests.strategies.test_multiprocess import TINY, env

    run_dir = tmp_path / "run"
    trainer, *overrides = option.split()
    stage0 = bool(overrides)
    args = [f"trainer={trainer}", *overrides, "trainer.devices=1", f"trainer.precision={precision}", *TINY,
            "trainer.max_steps=5", f"callbacks.nonfinite.policy={policy}",
            "+callbacks.poison._target_=tests.strategies.poison_grads.PoisonGradsAt",
            "+callbacks.poison.step=2", f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    # DeepSpeed's own skip; at stage 0 in fp32 the guard's (skip: it drops the gradients).
    assert ("OVERFLOW! Skipping step" in proc.stdout + proc.stderr) is not stage0
    if stage0 and policy == "skip":  # refused before the first step
        assert proc.returncode != 0 and "callbacks.nonfinite.policy='skip'" in proc.stderr
        assert "ZeRO stage 0 in fp32 with gradient clipping" in proc.stderr
        return
    record = read_record(run_dir)
    if policy == "stop":
        assert proc.returncode != 0 and "non-finite loss or gradients at step 2" in proc.stderr
        assert record["status"] == "failed"
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert record["status"] == "completed" and record["step"] == 5
        assert record["metrics"]["train/skipped_steps"] == 1.0
