"""`check_run`: what a trainer config asks for, and the refusals made before any process starts
(the end-to-end versions, through `run`, are in tests/test_invalid_configs.py)."""

from __future__ import annotations

import pytest

from lmlab.errors import ConfigError
from lmlab.strategies import check_run, strategy_info
from tests.conftest import compose_config


@pytest.fixture
def cfg_for(tmp_path):
    def make(*overrides: str):
        return compose_config(list(overrides), tmp_path / "run", tmp_path / "cache")

    return make


@pytest.mark.parametrize("option,kind,stage,shards", [
    ("default", "single", None, False),
    ("ddp", "ddp", None, False),
    ("fsdp", "fsdp", None, True),
    ("deepspeed_zero1", "deepspeed", 1, False),
    ("deepspeed_zero2", "deepspeed", 2, False),
    ("deepspeed_zero3", "deepspeed", 3, True),
    ("deepspeed_zero3_offload", "deepspeed", 3, True),
])
def test_strategy_info(cfg_for, option, kind, stage, shards):
    info = strategy_info(cfg_for(f"trainer={option}").trainer)
    assert (info.kind, info.zero_stage, info.shards_parameters) == (kind, stage, shards)
    assert info.world_size == (1 if option == "default" else 2)
    assert check_run(cfg_for(f"trainer={option}")) == info


def test_offload_option_offloads(cfg_for):
    info = strategy_info(cfg_for("trainer=deepspeed_zero3_offload").trainer)
    assert info.offload and info.label == "deepspeed_zero3_offload"


@pytest.mark.parametrize("overrides,field,says", [
    (["trainer=deepspeed_zero2", "trainer.strategy.config.zero_optimization.stage=4"],
     "trainer.strategy.config.zero_optimization.stage", "0, 1, 2, 3"),
    (["trainer=deepspeed_zero1", "+trainer.strategy.config.zero_optimization.offload_param={device:cpu}"],
     "trainer.strategy.config.zero_optimization.offload_param", "stage 3"),
    (["trainer=deepspeed_zero3", "trainer.strategy.config.zero_optimization.reduce_bucket_size=0"],
     "trainer.strategy.config.zero_optimization.reduce_bucket_size", "greater than 0"),
    (["trainer=fsdp", "trainer.devices=1"], "trainer.devices", "nothing to shard"),
    (["trainer=ddp", "trainer.precision=16-mixed"], "trainer.precision", "bf16-mixed"),
    (["+trainer.strategy=deepspeed"], "trainer.strategy", "deepspeed_zero"),
    (["trainer=fsdp", "peft=qlora"], "peft", "packed uint8"),
])
def test_refusals_name_the_field(cfg_for, overrides, field, says):
    with pytest.raises(ConfigError) as info:
        check_run(cfg_for(*overrides))
    assert info.value.field == field
    assert says in str(info.value)


def test_train_batch_size_must_match_processes(cfg_for):
    # tiny synthetic data: 8 sequences per process, 2 processes, no accumulation
    cfg = cfg_for("trainer=deepspeed_zero2", "+trainer.strategy.config.train_batch_size=16")
    assert check_run(cfg).world_size == 2
    with pytest.raises(ConfigError, match=r"valid: 32"):
        check_run(cfg_for("trainer=deepspeed_zero2", "+trainer.strategy.config.train_batch_size=16",
                          "trainer.accumulate_grad_batches=2"))


def test_gpu_option_is_checked_for_its_own_hardware(cfg_for):
    cfg = cfg_for("trainer=gpu")
    assert check_run(cfg, here=False).accelerator == "gpu"
