"""`peft=lora`: low-rank adapters injected by the `peft` library into lmlab's own backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from lmlab.errors import ConfigError
from lmlab.peft.base import PeftStrategy

if TYPE_CHECKING:
    from peft import LoraConfig

# `peft` is imported where it is used: it pulls in transformers, accelerate and networkx, about
# 2 s of every process's start (each sweep job, each rank), which runs without adapters would pay.


def linear_names(backbone: nn.Module) -> list[str]:
    """The distinct last components of Linear-layer names (q_proj, up_proj, lm_head, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)})


def check_targets(backbone: nn.Module, targets: list[str], field: str = "peft.target_modules") -> None:
    available = linear_names(backbone)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(field, missing, available, "matches no Linear layer of this backbone")


@dataclass
class LoRA(PeftStrategy):
    method = "lora"
    can_merge = True

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"  # none | all | lora_only
    use_rslora: bool = False  # scale by alpha/sqrt(r) (rank-stabilised LoRA)

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        if self.r < 1:
            raise ConfigError("peft.r", self.r, reason="LoRA rank must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("peft.dropout", self.dropout, reason="must be in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError("peft.bias", self.bias, ["none", "all", "lora_only"])
        if not self.target_modules:
            raise ConfigError("peft.target_modules", self.target_modules, reason="name at least one layer")

    def check(self, backbone: nn.Module) -> None:
        check_targets(backbone, self.target_modules)

    def peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            use_dora=self.method == "dora",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            use_rslora=self.use_rslora,
        )

    def apply(self, backbone: nn.Module) -> nn.Module:
        from peft import inject_adapter_in_model

        self.check(backbone)
        # inject_adapter_in_model freezes the base and leaves only adapter weights trainable.
        return inject_adapter_in_model(self.peft_config(), backbone)

    def merge(self, backbone: nn.Module) -> nn.Module:
        return merge_tuner_layers(backbone)


def merge_tuner_layers(backbone: nn.Module) -> nn.Module:
    """Fold every `peft` adapter (LoRA, DoRA, IA3) into its base layer and put the plain layer
    back in its place, leaving an ordinary backbone with no adapter parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            setattr(parent, child, module.get_base_layer())
    backbone.requires_grad_(True)
    return backbone


@dataclass
class DoRA(LoRA):
    """`peft=dora`: weight-decomposed LoRA (a learned magnitude per output row + a LoRA direction)."""

    method = "dora"
