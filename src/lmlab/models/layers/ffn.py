"""Position-wise feed-forward networks: a ReLU/GELU MLP or a SwiGLU gated unit.

`build_ffn(config, layer_index)` is how every family's blocks get their FFN: dense, or a
mixture of experts on the layers `config.is_moe_layer` picks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lmlab.models.config import ModelConfig

FFN_KINDS = ("relu", "gelu", "swiglu")


class FeedForward(nn.Module):
    """relu/gelu: down(act(up(x))). swiglu (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", bias: bool = True):
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"unknown ffn kind {kind!r} (valid: {', '.join(FFN_KINDS)})")
        self.kind = kind
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        if kind == "swiglu":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """token_mask is accepted for a uniform FFN call; position-wise, pads cannot leak."""
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        hidden = self.up_proj(x)
        hidden = F.relu(hidden) if self.kind == "relu" else F.gelu(hidden)
        return self.down_proj(hidden)


def build_ffn(config: ModelConfig, layer_index: int = 0) -> nn.Module | None:
    """The FFN of block `layer_index`; both kinds take `(x, token_mask=None)`. None for
    `ffn="none"` (a block that is its token mixer only, as in the original Mamba)."""
    # Imported here: moe.py builds its experts from FeedForward, so it imports this module.
    from lmlab.models.layers.moe import MoEFeedForward

    if config.ffn == "none":
        return None
    if config.is_moe_layer(layer_index):
        return MoEFeedForward(
            config.d_model,
            config.ffn_dim,
            config.expert_ffn,
            n_experts=config.n_experts,
            top_k=config.top_k,
            capacity_factor=config.capacity_factor,
            router=config.router,
            aux_loss_weight=config.aux_loss_weight,
            z_loss_weight=config.z_loss_weight,
            bias=config.bias,
        )
    return FeedForward(config.d_model, config.ffn_dim, config.ffn_kind, bias=config.bias)
