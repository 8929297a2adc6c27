"""Structured pruning: remove whole attention heads and FFN neurons, shrinking the layers.

Importance is the L2 norm of the weights a unit owns (Li et al. 2017's filter-norm criterion,
applied to transformer units): for a query head, its rows of `q_proj` and its columns of
`o_proj` (and, when it has its own key/value head, those rows of `k_proj`/`v_proj`); for an FFN
neuron, its rows of `up_proj`/`gate_proj` and its column of `down_proj`. Norms need no data
and no gradients, so the ranking is deterministic and reproducible.

Heads: in multi-head attention each head owns its key/value head and `heads` whole heads go.
With grouped keys/values (GQA/MQA) query head h reads key/value head h // group, so the same
number of query heads goes from every group (`heads` must be a multiple of `n_kv_heads`) and
the key/value heads stay: the mapping stays valid with a smaller group. Only self-attention
heads are pruned (cross-attention keeps its heads). FFN: `round(ffn_sparsity · d_ff)` neurons
of every dense FFN and of every expert.

Shrinking replaces the Linear layers with smaller ones and sets the attention module's
`n_heads`/`n_kv_heads` attributes (its forward reads them), so layers may differ in size from
`ModelConfig`. The KV cache is sized from the config, so the shrunk backbone's `new_cache`
is wrapped to resize each layer's key/value buffers to that layer's heads. A shrunk backbone
cannot be rebuilt from its `ModelConfig`: it is evaluated (and fine-tuned) in the run, not
written as a checkpoint.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmlab.models.cache import KVCache
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.ffn import FeedForward


@dataclass
class StructuredPlan:
    """What to keep: attention module name → kept query-head indices (ascending, group-major),
    FFN module name → kept neuron indices."""

    heads: dict[str, list[int]] = field(default_factory=dict)
    neurons: dict[str, list[int]] = field(default_factory=dict)


def self_attentions(backbone: nn.Module) -> dict[str, MultiHeadAttention]:
    """Self-attention modules (cross-attention modules are named `cross_attn`)."""
    return {n: m for n, m in backbone.named_modules()
            if isinstance(m, MultiHeadAttention) and n.split(".")[-1] == "attn"}


def feed_forwards(backbone: nn.Module) -> dict[str, FeedForward]:
    return {n: m for n, m in backbone.named_modules() if isinstance(m, FeedForward)}


def _rows(weight: Tensor, n: int) -> Tensor:
    """Squared norm of each of n equal row blocks of a [n·d, in] weight."""
    return weight.detach().float().reshape(n, -1).pow(2).sum(-1)


def _cols(weight: Tensor, n: int) -> Tensor:
    """Squared norm of each of n equal column blocks of an [out, n·d] weight."""
    return weight.detach().float().reshape(weight.shape[0], n, -1).pow(2).sum((0, 2))


def head_scores(attn: MultiHeadAttention) -> Tensor:
    h, kv = attn.n_heads, attn.n_kv_heads
    score = _rows(attn.q_proj.weight, h) + _cols(attn.o_proj.weight, h)
    if kv == h:
        score = score + _rows(attn.k_proj.weight, h) + _rows(attn.v_proj.weight, h)
    return score.sqrt()


def neuron_scores(ffn: FeedForward) -> Tensor:
    score = _rows(ffn.up_proj.weight, ffn.up_proj.out_features) + _cols(ffn.down_proj.weight, ffn.down_proj.in_features)
    if ffn.kind == "swiglu":
        score = score + _rows(ffn.gate_proj.weight, ffn.gate_proj.out_features)
    return score.sqrt()


def _keep_top(scores: Tensor, n_keep: int) -> list[int]:
    # Stable: ties keep the lower index, so the plan is deterministic.
    order = torch.sort(-scores, stable=True).indices[:n_keep]
    return sorted(order.tolist())


def plan_structured(backbone: nn.Module, heads: int, ffn_sparsity: float) -> StructuredPlan:
    plan = StructuredPlan()
    if heads:
        for name, attn in self_attentions(backbone).items():
            h, kv = attn.n_heads, attn.n_kv_heads
            scores = head_scores(attn)
            if kv == h:
                plan.heads[name] = _keep_top(scores, h - heads)
                continue
            group = h // kv  # query heads of group g are g·group .. g·group + group − 1
            keep = []
            for g in range(kv):
                local = _keep_top(scores[g * group:(g + 1) * group], group - heads // kv)
                keep += [g * group + i for i in local]
            plan.heads[name] = keep
    if ffn_sparsity:
        for name, ffn in feed_forwards(backbone).items():
            d_ff = ffn.up_proj.out_features
            plan.neurons[name] = _keep_top(neuron_scores(ffn), d_ff - round(ffn_sparsity * d_ff))
    return plan


def _head_index(heads: list[int], head_dim: int) -> Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def _sliced(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        out.bias.data.copy_(bias[rows.to(bias.device)] if rows is not None else bias)
    out.weight.requires_grad_(linear.weight.requires_grad)
    return out


def mask_structured(backbone: nn.Module, plan: StructuredPlan) -> nn.Module:
    """The reference the shrunk model must equal: nothing removed, but the pruned units'
    contributions zeroed (their `o_proj` / `down_proj` input columns)."""
    modules = dict(backbone.named_modules())
    with torch.no_grad():
        for name, keep in plan.heads.items():
            attn = modules[name]
            dropped = sorted(set(range(attn.n_heads)) - set(keep))
            attn.o_proj.weight[:, _head_index(dropped, attn.head_dim)] = 0
        for name, keep in plan.neurons.items():
            ffn = modules[name]
            dropped = sorted(set(range(ffn.up_proj.out_features)) - set(keep))
            ffn.down_proj.weight[:, dropped] = 0
    return backbone


def shrink(backbone: nn.Module, plan: StructuredPlan) -> nn.Module:
    """Remove the pruned units for real (in place); see the module docstring."""
    modules = dict(backbone.named_modules())
    for name, keep in plan.heads.items():
        attn = modules[name]
        q_index = _head_index(keep, attn.head_dim)
        if attn.n_kv_heads == attn.n_heads:
            attn.k_proj = _sliced(attn.k_proj, rows=q_index)
            attn.v_proj = _sliced(attn.v_proj, rows=q_index)
            attn.n_kv_heads = len(keep)
        attn.q_proj = _sliced(attn.q_proj, rows=q_index)
        attn.o_proj = _sliced(attn.o_proj, cols=q_index)
        attn.n_heads = len(keep)
    for name, keep in plan.neurons.items():
        ffn = modules[name]
        index = torch.tensor(keep, dtype=torch.long)
        ffn.up_proj = _sliced(ffn.up_proj, rows=index)
        if ffn.kind == "swiglu":
            ffn.gate_proj = _sliced(ffn.gate_proj, rows=index)
        ffn.down_proj = _sliced(ffn.down_proj, cols=index)
    if plan.heads:
        _size_caches_per_layer(backbone)
    return backbone


def _size_caches_per_layer(backbone: nn.Module) -> None:
    """Wrap `new_cache` of every module that makes a KVCache over its `layers`, so each
    attention layer's buffers have that layer's key/value heads."""
    for module in backbone.modules():
        if not (hasattr(module, "new_cache") and isinstance(getattr(module, "layers", None), nn.ModuleList)):
            continue
        original = module.new_cache

        def new_cache(self, *args, _original=original, **kwargs):
            cache = _original(*args, **kwargs)
            if isinstance(cache, KVCache):
                for i, layer in enumerate(self.layers):
                    attn = getattr(layer, "attn", None)
                    buffer = cache.keys[i]
                    if attn is None or buffer is None or buffer.shape[1] == attn.n_kv_heads:
                        continue
                    shape = (buffer.shape[0], attn.n_kv_heads, *buffer.shape[2:])
                    cache.keys[i] = buffer.new_zeros(shape)
                    cache.values[i] = buffer.new_zeros(shape)
            return cache

        module.new_cache = types.MethodType(new_cache, module)


def count_heads_and_neurons(backbone: nn.Module) -> dict[str, int]:
    return {
        "attention_heads": sum(a.n_heads for a in self_attentions(backbone).values()),
        "ffn_neurons": sum(f.up_proj.out_features for f in feed_forwards(backbone).values()),
    }
