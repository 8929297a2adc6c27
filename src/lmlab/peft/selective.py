"""Methods that train a subset of the backbone's own parameters: `bitfit` and `frozen`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmlab.peft.base import PeftStrategy

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """torch's norms, and the models' own (model=hf: transformers' LlamaRMSNorm, T5LayerNorm,
    ...), which are not subclasses of them."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("LayerNorm",
                                                                             "RMSNorm"))


@dataclass
class BitFit(PeftStrategy):
    """`peft=bitfit`: only biases and normalisation weights train (Ben Zaken et al., 2022)."""

    method = "bitfit"

    def apply(self, backbone: nn.Module) -> nn.Module:
        backbone.requires_grad_(False)
        for module in backbone.modules():
            for name, param in module.named_parameters(recurse=False):
                if name == "bias" or is_norm(module):
                    param.requires_grad_(True)
        return backbone


@dataclass
class Frozen(PeftStrategy):
    """`peft=frozen`: the backbone does not train at all; only a task head does (e.g. classify)."""

    method = "frozen"

    def apply(self, backbone: nn.Module) -> nn.Module:
        return backbone.requires_grad_(False)
