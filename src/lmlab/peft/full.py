"""`peft=none` (train everything, e.g. from scratch) and `peft=full` (full fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmlab.peft.base import PeftStrategy


@dataclass
class NoPeft(PeftStrategy):
    method = "none"

    def apply(self, backbone: nn.Module) -> nn.Module:
        backbone.requires_grad_(True)
        return backbone


@dataclass
class FullFineTuning(NoPeft):
    """Every weight trains; the same as `none`, named so records of fine-tuning runs say so."""

    method = "full"
