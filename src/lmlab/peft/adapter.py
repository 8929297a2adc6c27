"""`peft=adapter`: bottleneck adapters inside every block (Houlsby et al. 2019; Pfeiffer et al. 2021).

An adapter is `h + up(dropout(act(down(h))))` with `down: d_model -> bottleneck` and `up`
zero-initialised, so a freshly adapted model computes exactly what its base does. It is applied
to a sublayer's output before the residual add (and, in post-LN blocks, before the norm), as in
the papers:

    houlsby:  after every token mixer (self-attention or Mamba), cross-attention and FFN
    pfeiffer: after each block's last sublayer only: the FFN, or the mixer in FFN-less blocks

The backbone's code is untouched: each adapter is registered as a child `adapter` of the
sublayer it follows (`layers.0.ffn.adapter.down.weight`) and applied by a forward hook, so the
base's parameter names, KV caches and every family (decoder, MoE, Mamba, hybrid, encoder,
encoder-decoder) keep working. Adapters are extra non-linear layers: they cannot be merged into
the base (`lmlab export --adapter-only` saves them alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.peft.base import PeftStrategy
from lmlab.peft.selective import is_norm

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "identity": nn.Identity}
PLACEMENTS = ("houlsby", "pfeiffer")


class BottleneckAdapter(nn.Module):
    def __init__(self, d_model: int, bottleneck: int, activation: str, dropout: float):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.normal_(self.down.weight, std=d_model ** -0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at init
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.dropout(self.act(self.down(h))))


def _adapt_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: pass the sublayer's output through its adapter (a module-level function,
    so hooked models deep-copy and pickle)."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def block_sublayers(block: nn.Module) -> list[nn.Module]:
    """A block's residual sublayers in order: token mixer, cross-attention, FFN (present ones)."""
    names = ("attn", "mamba", "cross_attn", "ffn")
    return [getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)]


def blocks_of(backbone: nn.Module) -> list[nn.Module]:
    from lmlab.models.decoder import DecoderBlock
    from lmlab.models.transformer_layer import TransformerLayer

    return [m for m in backbone.modules() if isinstance(m, (DecoderBlock, TransformerLayer))]


@dataclass
class BottleneckAdapters(PeftStrategy):
    method = "adapter"
    cannot_merge_reason = ("adapters are extra non-linear layers, not a change of the base's "
                           "weights")

    bottleneck: int = 32  # adapter width (d_model -> bottleneck -> d_model)
    placement: str = "houlsby"  # houlsby | pfeiffer
    activation: str = "relu"  # relu | gelu | silu | tanh | sigmoid | identity
    dropout: float = 0.0  # dropout on the bottleneck activations
    train_norms: bool = False  # Houlsby et al. also train the layer norms

    def __post_init__(self) -> None:
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1:
            raise ConfigError("peft.bottleneck", self.bottleneck, reason="must be a positive integer")
        if self.placement not in PLACEMENTS:
            raise ConfigError("peft.placement", self.placement, PLACEMENTS)
        if self.activation not in ACTIVATIONS:
            raise ConfigError("peft.activation", self.activation, list(ACTIVATIONS))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("peft.dropout", self.dropout, reason="must be in [0, 1)")
        self._count = 0

    def check(self, backbone: nn.Module) -> None:
        if getattr(getattr(backbone, "config", None), "hf_path", None):
            raise ConfigError(
                "peft", self.method, ["lora", "dora", "ia3", "bitfit", "full"],
                "peft=adapter hooks into lmlab's own blocks; model=hf has other module layouts",
            )
        if not blocks_of(backbone):
            raise ConfigError("peft", self.method, reason="the backbone has no transformer/Mamba blocks to adapt")

    def targets(self, backbone: nn.Module) -> list[nn.Module]:
        out = []
        for block in blocks_of(backbone):
            sublayers = block_sublayers(block)
            out.extend(sublayers if self.placement == "houlsby" else sublayers[-1:])
        return out

    def apply(self, backbone: nn.Module) -> nn.Module:
        self.check(backbone)
        backbone.requires_grad_(False)
        d_model = backbone.config.d_model
        weight = next(backbone.parameters())
        targets = self.targets(backbone)
        for sublayer in targets:
            sublayer.adapter = BottleneckAdapter(d_model, self.bottleneck, self.activation, self.dropout).to(
                device=weight.device, dtype=weight.dtype)
            sublayer.register_forward_hook(_adapt_output)
        if self.train_norms:
            for module in backbone.modules():
                if is_norm(module):
                    module.requires_grad_(True)
        self._count = len(targets)
        return backbone

    def report(self) -> dict[str, Any]:
        return {"adapters": self._count}
