"""Position-wise feed-forward networks: a ReLU/GELU MLP or a SwiGLU gated unit."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

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

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        hidden = self.up_proj(x)
        hidden = F.relu(hidden) if self.kind == "relu" else F.gelu(hidden)
        return self.down_proj(hidden)
