"""Distributed strategies (`trainer=ddp|fsdp|deepspeed_zero*`): checking a trainer config
before any process starts, launching the other ranks, consolidating sharded checkpoints."""

from __future__ import annotations

from typing import Any

__all__ = ["StrategyInfo", "check_run", "check_trainer", "strategy_info"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: importing the package must stay light, as train.py starts the other
    # ranks (strategies.warm_ranks) before torch is imported.
    if name in __all__:
        from lmlab.strategies import check

        return getattr(check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
