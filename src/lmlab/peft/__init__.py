"""PEFT strategies: `apply(backbone) -> backbone`, parameter reports, `merge()` for export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmlab.errors import ConfigError
from lmlab.peft.adapter import BottleneckAdapters
from lmlab.peft.base import PeftStrategy, parameter_counts
from lmlab.peft.full import FullFineTuning, NoPeft
from lmlab.peft.ia3 import IA3
from lmlab.peft.lora import DoRA, LoRA
from lmlab.peft.prefix import PrefixTuning
from lmlab.peft.prompt import PromptTuning
from lmlab.peft.qlora import QLoRA
from lmlab.peft.selective import BitFit, Frozen

STRATEGIES: dict[str, type[PeftStrategy]] = {
    cls.method: cls for cls in (NoPeft, FullFineTuning, LoRA, DoRA, IA3, BitFit, Frozen, QLoRA,
                                    PrefixTuning, PromptTuning, BottleneckAdapters)
}


def build_peft_strategy(cfg: Mapping[str, Any] | None) -> PeftStrategy:
    cfg = dict(cfg or {"method": "none"})
    method = cfg.get("method", "none")
    if method not in STRATEGIES:
        raise ConfigError("peft.method", method, sorted(STRATEGIES), "unknown PEFT method")
    return STRATEGIES[method].from_dict(cfg)


__all__ = ["PeftStrategy", "STRATEGIES", "build_peft_strategy", "parameter_counts"]
