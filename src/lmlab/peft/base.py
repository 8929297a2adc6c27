"""The PEFT strategy contract: which parameters of a backbone train, and how."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lmlab.instantiate import dataclass_from_config


def logical_numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for: a bitsandbytes 4-bit weight packs two per byte and keeps
    its original shape in its quantisation state."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def parameter_counts(module: nn.Module) -> dict[str, int]:
    total = sum(logical_numel(p) for p in module.parameters())
    trainable = sum(logical_numel(p) for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's state dict (weights, buffers, quantisation statistics), tied tensors
    counted once: what it occupies in memory and in a checkpoint."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.data_ptr(), tensor.nbytes)
        if key in seen and tensor.nbytes:
            continue
        seen.add(key)
        total += tensor.nbytes
    return total


@dataclass
class PeftStrategy(ABC):
    """Transforms a backbone in place: freezes and/or injects parameters.

    Subclasses are dataclasses whose fields are the `peft.*` config fields (besides `method`).
    """

    method: ClassVar[str]
    can_merge: ClassVar[bool] = False
    # Why a method that adds parameters cannot fold them into the base (said by `lmlab export`).
    cannot_merge_reason: ClassVar[str] = "its extra parameters have no place in a plain backbone"

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

    def report(self) -> dict[str, Any]:
        """Measurements the method made while applying (e.g. QLoRA's weight bytes before/after
        quantization); stored in the run record under `peft_report`."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> PeftStrategy:
        return dataclass_from_config(cls, cfg, "peft", cls.method)
