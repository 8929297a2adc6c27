"""Which PEFT methods a distributed strategy can train, and why not where it cannot."""

from __future__ import annotations

from lmlab.errors import ConfigError
from lmlab.strategies.check import StrategyInfo


def quantizes_base(method: str) -> bool:
    """PEFT methods whose frozen base is bitsandbytes 4-bit (packed uint8 + per-layer state)."""
    from lmlab.peft import STRATEGIES

    cls = STRATEGIES.get(method)
    return method == "qlora" or bool(getattr(cls, "quantizes_base", False))


def check_peft_with_strategy(info: StrategyInfo, method: str) -> None:
    if quantizes_base(method) and info.shards_parameters:
        raise ConfigError(
            "peft", method, ["lora", "dora", "ia3", "..."],
            f"{info.label} splits every weight across ranks, but a bitsandbytes 4-bit weight is packed "
            "uint8 data with a per-layer quantization state that cannot be sliced; use peft=lora with "
            f"{info.label}, or peft={method} with trainer=ddp or deepspeed_zero1/2",
        )
