"""Distributed strategies (`trainer=ddp|fsdp|deepspeed_zero*`): checking a trainer config
before any process starts, launching the other ranks, consolidating sharded checkpoints."""

from lmlab.strategies.check import StrategyInfo, check_run, check_trainer, strategy_info

__all__ = ["StrategyInfo", "check_run", "check_trainer", "strategy_info"]
