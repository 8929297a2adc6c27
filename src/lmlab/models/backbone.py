"""What the backbones built from a `ModelConfig` share: the build-time check, the GPT-2 style
init, and the questions tasks and reports ask every backbone (`Backbone`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.config import ModelConfig
from lmlab.models.layers.moe import collect_auxiliary_losses, collect_expert_load

# Linear weights that write into a residual stream (depth-scaled at init): attention and FFN
# outputs (every expert's), Mamba's out_proj.
RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "out_proj.weight")


def check_buildable(config: ModelConfig) -> None:
    """Validate `config` and insist on the vocabulary size the tokenizer sets."""
    config.validate()
    if config.vocab_size <= 0:
        raise ConfigError("model.vocab_size", config.vocab_size, "the tokenizer's vocab size",
                          "must be set from the tokenizer before building the model")


def init_weights(model: nn.Module, std: float,
                 residual_streams: Iterable[tuple[nn.Module, int]]) -> None:
    """GPT-2 style init: N(0, std) weights, zero biases, residual projections scaled down.

    residual_streams: (module, number of sublayers writing into its residual stream). Every
    projection into a stream gets std / sqrt(that number), so the stream's variance does not
    grow with depth.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
    for stream, n_writes in residual_streams:
        residual_std = std / math.sqrt(n_writes)
        for name, param in stream.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=residual_std)


class Backbone(nn.Module):
    """Base of lmlab's own backbones: checks `config` (`check_buildable`) and keeps it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_buildable(config)
        self.config = config

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted MoE losses of the last forward ({} without MoE layers); add to the loss."""
        return collect_auxiliary_losses(self)

    def expert_load(self) -> Tensor | None:
        """[n_moe_layers, n_experts] fraction of routing decisions per expert, last forward."""
        return collect_expert_load(self)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied embedding/lm_head weight is counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
