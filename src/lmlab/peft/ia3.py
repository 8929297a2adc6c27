"""`peft=ia3`: learned rescaling vectors on keys, values and the FFN input (IA3), via `peft`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lmlab.errors import ConfigError
from lmlab.peft.base import PeftStrategy
from lmlab.peft.lora import check_targets, merge_tuner_layers


@dataclass
class IA3(PeftStrategy):
    method = "ia3"
    can_merge = True

    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        self.feedforward_modules = list(self.feedforward_modules)
        if not self.target_modules:
            raise ConfigError("peft.target_modules", self.target_modules, reason="name at least one layer")
        stray = [m for m in self.feedforward_modules if m not in self.target_modules]
        if stray:
            raise ConfigError("peft.feedforward_modules", stray, self.target_modules,
                              "feed-forward modules must also be target modules")

    def check(self, backbone: nn.Module) -> None:
        check_targets(backbone, self.target_modules)

    def apply(self, backbone: nn.Module) -> nn.Module:
        from peft import IA3Config, inject_adapter_in_model  # lazily: see lmlab.peft.lora

        self.check(backbone)
        config = IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules)
        return inject_adapter_in_model(config, backbone)

    def merge(self, backbone: nn.Module) -> nn.Module:
        return merge_tuner_layers(backbone)
