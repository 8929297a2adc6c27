"""The strategies on CUDA GPUs (skipped where there is none): one short run per option with as
many processes as there are GPUs (up to 2), through the same code path as the CPU runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lmlab.record import read_record
from tests.strategies.test_multiprocess import TINY, train

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
OPTIONS = ["gpu", "ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("option", OPTIONS)
def test_strategy_trains_on_gpu(option, tmp_path):
    devices = 1 if option == "gpu" else min(GPUS, 2)
    if option == "fsdp" and devices < 2:
        pytest.skip("trainer=fsdp shards over >= 2 GPUs")
    if option.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (the lent GPU machines' image has none)")
    run_dir = tmp_path / "run"
    train([f"trainer={option}", f"trainer.devices={devices}", "trainer.precision=bf16-mixed", *TINY,
           f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"])
    record = read_record(run_dir)
    assert record["status"] == "completed" and record["step"] == 4
