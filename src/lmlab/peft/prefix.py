"""`peft=prefix`: learned key/value prefixes in every attention layer (Li & Liang, 2021).

Each attention layer attends to `n_virtual_tokens` learned keys and values before the
sequence's own (`lmlab.models.layers.attention.prepend_prefix`: always visible, never rotated,
zero ALiBi/relative bias, one set per key/value head so GQA/MQA keep their sizes). The
backbone is frozen; only the `PrefixEncoder` (`backbone.prefix_encoder`) trains. With
`reparameterize`, the prefixes are an MLP of a small embedding, as in the paper, which trains
more stably; the MLP is shared by all layers. Encoder-decoders get prefixes in the encoder's
and the decoder's self-attention and, with `cross_attention` (Li & Liang's BART setup), in
cross-attention. `model=hf` goes through `peft`'s PrefixTuningConfig (`hf_prompt.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.cross_attention import CrossAttention
from lmlab.peft.base import PeftStrategy


class PrefixEncoder(nn.Module):
    """The prefixes of `n_slots` attention layers: keys and values [n_kv_heads, P, head_dim] each.

    Direct: one parameter `prefix` [n_slots, 2, n_kv_heads, P, head_dim]. Reparameterised:
    `embedding` [P, d_model] -> Linear(d_model, hidden) -> tanh -> Linear(hidden, n_slots * 2 *
    kv_dim); a slot computes only its own rows of the last Linear.
    """

    def __init__(self, n_slots: int, n_virtual_tokens: int, n_kv_heads: int, head_dim: int,
                 d_model: int, reparameterize: bool = False, hidden_size: int | None = None,
                 init_std: float = 0.02):
        super().__init__()
        self.n_slots, self.n_virtual_tokens = n_slots, n_virtual_tokens
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.reparameterize = reparameterize
        if reparameterize:
            hidden = hidden_size or d_model
            # N(0, 1) like peft's nn.Embedding: tanh then sees inputs of unit scale.
            self.embedding = nn.Parameter(torch.randn(n_virtual_tokens, d_model))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(),
                                     nn.Linear(hidden, n_slots * 2 * n_kv_heads * head_dim))
            self.prefix = None
        else:
            self.prefix = nn.Parameter(
                torch.randn(n_slots, 2, n_kv_heads, n_virtual_tokens, head_dim) * init_std)

    def layer_kv(self, slot: int) -> tuple[Tensor, Tensor]:
        """Keys and values of attention layer `slot`, each [1, n_kv_heads, P, head_dim]."""
        if self.prefix is not None:
            return self.prefix[slot, 0][None], self.prefix[slot, 1][None]
        width = 2 * self.n_kv_heads * self.head_dim
        hidden = self.mlp[1](self.mlp[0](self.embedding))
        out = self.mlp[2]
        rows = slice(slot * width, (slot + 1) * width)
        kv = nn.functional.linear(hidden, out.weight[rows], out.bias[rows])  # [P, 2 * kv_dim]
        kv = kv.view(self.n_virtual_tokens, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0][None], kv[1][None]

    def all_kv(self) -> Tensor:
        """Every slot's prefixes [n_slots, 2, n_kv_heads, P, head_dim] (e.g. to inspect them)."""
        return torch.stack([torch.stack(self.layer_kv(i))[:, 0] for i in range(self.n_slots)])


def attention_slots(backbone: nn.Module, cross_attention: bool) -> list[MultiHeadAttention]:
    """The attention modules that get a prefix, in module order."""
    return [m for m in backbone.modules() if isinstance(m, MultiHeadAttention)
            and (cross_attention or not isinstance(m, CrossAttention))]


def is_hf(backbone: nn.Module) -> bool:
    """Whether `backbone` wraps a Hugging Face model (`model=hf`), which peft's own versions serve."""
    from lmlab.models.hf_backbone import HFBackbone

    return isinstance(backbone, HFBackbone)


@dataclass
class PrefixTuning(PeftStrategy):
    method = "prefix"
    can_merge = False
    cannot_merge_reason = ("prefix tuning adds learned keys/values to every attention layer, an extra "
                           "input rather than a weight update, so it cannot be folded into the weights")

    n_virtual_tokens: int = 10  # prefix length P per attention layer
    reparameterize: bool = False  # prefixes = MLP(embedding) (Li & Liang) instead of free tensors
    hidden_size: int | None = None  # width of the reparameterisation MLP; null = d_model
    init_std: float = 0.02  # std of the random init of the prefixes (not reparameterised)
    cross_attention: bool = True  # encoder-decoder: also prefix the decoder's cross-attention

    def __post_init__(self) -> None:
        if not isinstance(self.n_virtual_tokens, int) or self.n_virtual_tokens < 1:
            raise ConfigError("peft.n_virtual_tokens", self.n_virtual_tokens, "an integer >= 1")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ConfigError("peft.hidden_size", self.hidden_size, "an integer >= 1 or null")
        if self.hidden_size is not None and not self.reparameterize:
            raise ConfigError("peft.hidden_size", self.hidden_size, ["null"],
                              "only the MLP of peft.reparameterize=true has a hidden size")
        if self.init_std <= 0:
            raise ConfigError("peft.init_std", self.init_std, "a positive number")

    def check(self, backbone: nn.Module) -> None:
        if is_hf(backbone):
            return
        if not attention_slots(backbone, self.cross_attention):
            config = backbone.config
            raise ConfigError(
                "peft.method", self.method,
                "another method (prompt, lora, ...) or a model with attention layers",
                f"model.mixer={config.mixer} has no attention layer to put key/value prefixes "
                "in (a hybrid model.layer_pattern has some)")

    def apply(self, backbone: nn.Module) -> nn.Module:
        self.check(backbone)
        if is_hf(backbone):
            from lmlab.peft.hf_prompt import wrap_hf_prompt_learning

            return wrap_hf_prompt_learning(backbone, self)
        backbone.requires_grad_(False)
        slots = attention_slots(backbone, self.cross_attention)
        first = slots[0]
        encoder = PrefixEncoder(
            len(slots), self.n_virtual_tokens, first.n_kv_heads, first.head_dim,
            backbone.config.d_model, self.reparameterize, self.hidden_size, self.init_std,
        ).to(next(backbone.parameters()).device)
        backbone.prefix_encoder = encoder
        for i, attn in enumerate(slots):
            # A plain callable, not a submodule: the parameters are registered once, under
            # `prefix_encoder`, not again under every attention layer.
            attn.prefix_kv = partial(encoder.layer_kv, i)
        return backbone

    def merge(self, backbone: nn.Module) -> nn.Module:
        raise ConfigError("peft.method", self.method, ["lora", "dora", "ia3"], self.cannot_merge_reason)
