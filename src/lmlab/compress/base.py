"""The compression strategy contract: what a `compress=` option does to a trained backbone.

A strategy is a dataclass whose fields are the `compress.*` config fields (besides `method`).
It checks itself on the config alone (`__post_init__`) and on the backbone it will get
(`check`), may hook into training (`callbacks`, e.g. gradual pruning), and `apply` turns the
trained backbone into the compressed one. `lmlab.compress.flow` measures before and after.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from lightning.pytorch.callbacks import Callback
from torch import nn

from lmlab.errors import ConfigError
from lmlab.instantiate import dataclass_from_config


def check_choice(field: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"compress.{field}", value, list(valid), "unknown choice")


def check_int(field: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"compress.{field}", value,
                          reason=f"must be an integer >= {minimum}" + (" or null" if allow_none else ""))


def check_fraction(field: str, value: Any) -> None:
    """A share of weights to remove: 0 (nothing) up to, but not including, 1 (everything)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"compress.{field}", value, reason="must be a number in [0, 1)")


@dataclass
class Compression(ABC):
    """One `compress=` method; see the module docstring."""

    method: ClassVar[str]
    #: evaluate and run the compressed model on the CPU (bitsandbytes/torch quantized kernels)
    cpu_only: ClassVar[bool] = False
    #: measure generation latency per token before and after (quantization)
    measures_latency: ClassVar[bool] = False
    #: train this many more steps after `apply` (pruning), then evaluate again
    finetune_steps = 0  # not a field here (no annotation); compress=prune has it as one

    def check(self, backbone: nn.Module, max_steps: int | None) -> None:
        """Fail before compute if the method cannot apply to this backbone (a weightless
        meta-device copy is enough) or to a run of `max_steps`."""
        return None

    def callbacks(self) -> list[Callback]:
        """Lightning callbacks the main training run needs (e.g. gradual pruning)."""
        return []

    @abstractmethod
    def apply(self, backbone: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """Compress a trained backbone; returns the compressed backbone (possibly the same
        object, changed in place) and what the record should say about it."""

    def finish(self, backbone: nn.Module) -> nn.Module:
        """After fine-tuning (or straight after `apply`): make the compression permanent."""
        return backbone

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Compression:
        return dataclass_from_config(cls, cfg, "compress", cls.method)


@dataclass
class NoCompression(Compression):
    """`compress=none`: the trained model is the result."""

    method: ClassVar[str] = "none"

    def apply(self, backbone: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        return backbone, {}
