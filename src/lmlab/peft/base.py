"""The PEFT strategy contract: which parameters of a backbone train, and how."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from torch import nn

from lmlab.errors import ConfigError


def parameter_counts(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


@dataclass
class PeftStrategy(ABC):
    """Transforms a backbone in place: freezes and/or injects parameters.

    Subclasses are dataclasses whose fields are the `peft.*` config fields (besides `method`).
    """

    method: ClassVar[str]
    can_merge: ClassVar[bool] = False

    @abstractmethod
    def apply(self, backbone: nn.Module) -> nn.Module:
        """Make the backbone ready to train with this method; returns it."""

    def check(self, backbone: nn.Module) -> None:
        """Fail before compute if the method cannot apply to this backbone (default: always can)."""
        return None

    def merge(self, backbone: nn.Module) -> nn.Module:
        """Fold trained adapters into plain layers (for export). Identity when nothing is injected."""
        return backbone

    def trainable_parameters(self, backbone: nn.Module) -> dict[str, int]:
        return parameter_counts(backbone)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> PeftStrategy:
        valid = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in cfg.items():
            if key == "method":
                continue
            if key not in valid:
                raise ConfigError(f"peft.{key}", value, sorted(valid), f"peft={cls.method} has no such field")
            kwargs[key] = value
        return cls(**kwargs)
