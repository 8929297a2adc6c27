"""Methods that train a subset of the backbone's own parameters: `bitfit` and `frozen`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmlab.peft.base import PeftStrategy

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


@dataclass
class BitFit(PeftStrategy):
    """`peft=bitfit`: only biases and normalisation weights train (Ben Zaken et al., 2022)."""

    method = "bitfit"

    def apply(self, backbone: nn.Module) -> nn.Module:
        backbone.requires_grad_(False)
        for module in backbone.modules():
            for name, param in module.named_parameters(recurse=False):
                if name == "bias" or isinstance(module, NORM_TYPES):
                    param.requires_grad_(True)
        return backbone


@dataclass
class Frozen(PeftStrategy):
    """`peft=frozen`: the backbone does not train at all; only a task head does (e.g. classify)."""

    method = "frozen"

    def apply(self, backbone: nn.Module) -> nn.Module:
        return backbone.requires_grad_(False)
