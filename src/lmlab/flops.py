"""Analytic FLOPs of a model: per token for `lmlab describe` (`flops_per_token`), per training
batch of any shape for the throughput callback (`TrainingFlops`). What is counted, and how, is
in `lmlab.describe`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from torch import nn

from lmlab.gradient_flow import (
    ADAPTER_PARTS,
    MIXER_OUTPUTS,
    gradient_flow,
    token_side,
    virtual_tokens,
)
from lmlab.models.accounting import experts_per_token
from lmlab.models.config import ModelConfig

# Prefix tuning's reparameterisation MLP (lmlab's and peft's) and peft's prompt encoder.
_VIRTUAL_TOKEN_ENCODERS = {"prefix_encoder", "prompt_encoder"}


class Matmul(NamedTuple):
    """One weight matrix's share of a token's products (see `matmul_weights`)."""

    weights: float  # multiply-adds one token makes with it (MoE experts: by the share visited)
    trains: bool  # its weight gets a gradient
    input_grad: bool = True  # its input needs a gradient (something upstream trains)
    # Its layer's output needs one: the input does, or a parameter of the layer trains (its
    # weight or bias, or an adapter's: LoRA, IA3 under a peft-wrapped Linear).
    output_grad: bool = True


def _weight_numel(module: nn.Module) -> int:
    """Elements of the weight as multiplied: an `nn.Linear`'s in x out whatever its storage
    (bitsandbytes packs two 4-bit weights a byte; DeepSpeed ZeRO-3 empties partitioned weights,
    keeping their size in `ds_numel`)."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return getattr(module.weight, "ds_numel", None) or module.weight.numel()


def matmul_weights(backbone: nn.Module, config: ModelConfig | None) -> dict[str, Matmul]:
    """Module name -> `Matmul` for every Linear / Conv1d; `token_side` sorts the names into
    source/target for encoder-decoders. MoE experts count by the share of experts a token
    visits; transformers' Conv1D (GPT-2) is a Linear stored transposed. `input_grad` follows
    `gradient_flow`."""
    share = 1.0 if config is None else experts_per_token(config) / config.n_experts
    flow = gradient_flow(backbone)
    found: dict[str, Matmul] = {}
    layer_trains: dict[str, bool] = {}
    for name, module in backbone.named_modules():
        if not (isinstance(module, (nn.Linear, nn.Conv1d)) or type(module).__name__ == "Conv1D"):
            continue
        if _VIRTUAL_TOKEN_ENCODERS & set(name.split(".")):
            continue  # runs on the P virtual tokens once per batch, not on every token
        count = float(_weight_numel(module)) * (share if ".experts." in name else 1.0)
        layer = ADAPTER_PARTS.sub("", name)
        if layer not in layer_trains:
            layer_trains[layer] = any(p.requires_grad
                                      for p in backbone.get_submodule(layer).parameters())
        input_grad = flow.get(name, True)
        found[name] = Matmul(count, bool(module.weight.requires_grad), input_grad,
                             input_grad or layer_trains[layer])
    return found


def attention_keys(config: ModelConfig, T: int, causal: bool) -> int:
    """Keys a query can see: T, or a sliding window's reach (what a KV cache keeps). The FLOP
    counts score all T keys: the window is a mask over them, computed like causal masking."""
    if config.sliding_window is None:
        return T
    reach = config.sliding_window if causal else 2 * config.sliding_window - 1
    return min(T, reach + config.global_tokens)


def matmul_flops(matmul: Iterable[Matmul]) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of the products: the backward is the input gradient
    where the input needs one, plus the weight gradient where the weight trains."""
    matmul = list(matmul)
    return (2 * sum(m.weights for m in matmul),
            sum(2 * m.weights * (m.trains + m.input_grad) for m in matmul))


_LORA = re.compile(r"\.lora_\w+(\.\w+)?$")


def _attention_share(matmul: dict[str, Matmul], by_layer: dict[str, list[Matmul]], output: str,
                     prefix: bool) -> float:
    """The share of one attention's backward products autograd runs: of d(v) = pᵀ d(out),
    d(p) = d(out) vᵀ, d(q) = d(s) k and d(k) = d(s)ᵀ q, those whose inputs need a gradient
    (q, k, v: their projection's input does, or a weight under it trains; prefix keys and
    values train). Without q/k/v projections by those names (model=hf's fused ones), all four
    or none, by the output projection's input."""
    attention = ADAPTER_PARTS.sub("", output).rsplit(".", 1)[0]
    grads = {}
    for part in ("q", "k", "v"):
        # All of `matmul`, not `names`: a cross-attention's k/v are on the source side.
        under = by_layer.get(f"{attention}.{part}_proj")
        if not under:
            return float(matmul[output].input_grad)
        grads[part] = any(m.output_grad for m in under)
    k, v = grads["k"] or prefix, grads["v"] or prefix
    return (v + (grads["q"] or k) + grads["q"] + k) / 4


def backward_shares(matmul: dict[str, Matmul], names: Iterable[str] | None = None,
                    prefix: bool = False, cross_prefix: bool = False) -> dict[str, float]:
    """The share of the self-attention, cross-attention and Mamba layers' backward work (among
    `names`, default all) that autograd runs: attention by `_attention_share`, a Mamba scan
    whole or not at all by its output projection's input; 1.0 where no layer is found.
    `prefix` / `cross_prefix`: prefix tuning's trained keys and values in every self- /
    cross-attention layer."""
    names = list(matmul if names is None else names)
    by_layer: dict[str, list[Matmul]] = {}  # the products under each (peft-wrapped) layer
    for name, m in matmul.items():
        by_layer.setdefault(ADAPTER_PARTS.sub("", name), []).append(m)
    shares = {}
    for kind, pattern in MIXER_OUTPUTS.items():
        # An adapted output projection: its base layer's input (a LoRA B matrix reads A's
        # output). "cross_attn.o_proj" is no self-attention match: "attn" must follow a dot.
        outputs = [n for n in names if not _LORA.search(n)
                   and pattern.search(ADAPTER_PARTS.sub("", n))]
        if kind == "mamba":
            flags = [float(matmul[n].input_grad) for n in outputs]
        else:
            prefixed = cross_prefix if kind == "cross" else prefix
            flags = [_attention_share(matmul, by_layer, n, prefixed) for n in outputs]
        shares[kind] = sum(flags) / len(flags) if flags else 1.0
    return shares


def _stack_flops(config: ModelConfig, matmul: list[Matmul], n_attention: int,
                 keys: int, n_mamba: int, cross_keys: int = 0, n_cross: int = 0,
                 backward: dict[str, float] | None = None) -> dict[str, float]:
    """`backward`: the shares of the layers of each kind that run backward (`backward_shares`)."""
    backward = backward or {}
    mm_forward, mm_backward = matmul_flops(matmul)
    per_layer = 4 * config.n_heads * config.head_dim
    self_attention, cross_attention = per_layer * n_attention * keys, per_layer * n_cross * cross_keys
    attention = self_attention + cross_attention
    scan = n_mamba * (9 * config.d_state + 2) * config.d_inner
    forward = mm_forward + attention + scan
    backward_rest = 2 * (self_attention * backward.get("self", 1.0)
                         + cross_attention * backward.get("cross", 1.0)
                         + scan * backward.get("mamba", 1.0))
    return {"forward": forward, "forward_backward": forward + mm_backward + backward_rest,
            "matmul": mm_forward, "attention": attention, "ssm_scan": scan}


def flops_per_token(config: ModelConfig, matmul: dict[str, Matmul], T: int) -> dict[str, Any]:
    if config.family != "encoder_decoder":
        return {k: round(v) for k, v in _side_flops(config, matmul, T)["target"].items()}
    sides = _side_flops(config, matmul, T, T)
    source, target = sides["source"], sides["target"]
    out = {k: round((source[k] + target[k]) / 2) for k in source}
    out["per_source_token"] = {k: round(v) for k, v in source.items()}
    out["per_target_token"] = {k: round(v) for k, v in target.items()}
    return out


def side_backward_shares(config: ModelConfig, matmul: dict[str, Matmul], prefix_keys: int = 0,
                         prefix_cross_keys: int = 0) -> dict[str, dict[str, float]]:
    """`backward_shares` of each side ("target", and "source" for encoder-decoders): they
    depend on the model only, not on the batch's shape."""
    if config.family != "encoder_decoder":
        return {"target": backward_shares(matmul, prefix=bool(prefix_keys))}
    sides = {side: [k for k in matmul if token_side(k) == side] for side in ("source", "target")}
    return {"source": backward_shares(matmul, sides["source"], bool(prefix_keys)),
            "target": backward_shares(matmul, sides["target"], bool(prefix_keys),
                                      bool(prefix_cross_keys))}


def _side_flops(config: ModelConfig, matmul: dict[str, Matmul], T: int,
                S: int | None = None, prefix_keys: int = 0,
                prefix_cross_keys: int = 0,
                shares: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Per-token FLOPs of each side: "target" (a decoder's or encoder's tokens, T of them per
    sequence) and, for encoder_decoder, "source" (S source tokens; the decoder's
    cross-attention scores S keys). `prefix_keys` / `prefix_cross_keys`: keys every
    self-attention / cross-attention layer scores in addition (prefix tuning's virtual keys)."""
    mixers = config.layer_mixers
    shares = shares or side_backward_shares(config, matmul, prefix_keys, prefix_cross_keys)
    if config.family != "encoder_decoder":
        keys = T + prefix_keys
        return {"target": _stack_flops(config, list(matmul.values()), mixers.count("attention"),
                                       keys, mixers.count("mamba"), backward=shares["target"])}
    S = T if S is None else S
    n_dec = config.n_decoder_layers or config.n_layers
    sides = {side: [m for k, m in matmul.items() if token_side(k) == side]
             for side in ("source", "target")}
    source = _stack_flops(config, sides["source"], config.n_layers, S + prefix_keys, 0,
                          backward=shares["source"])
    target = _stack_flops(config, sides["target"], n_dec, T + prefix_keys, 0,
                          cross_keys=S + prefix_cross_keys, n_cross=n_dec,
                          backward=shares["target"])
    return {"source": source, "target": target}


# Output layers: a task may run them on a share of the positions only (mlm: the masked ones;
# classify: none, its own head is negligible).
_HEAD_MODULES = {"lm_head", "mlm_transform"}


class TrainingFlops:
    """Forward+backward FLOPs of one training batch, by `describe`'s arithmetic, for any
    batch shape: `batch(B, T)` for decoders/encoders, `batch(B, T, S)` for encoder-decoders
    (T target, S source positions). Padded positions count (the hardware computes them).

    `head_fraction` scales the output layer (the share of positions a task runs it on).
    `row_modules` (the last encoder layer after its attention: `output_row_modules` of the
    backbone) run on some positions only too: `rows_per_sequence` of the T of each sequence
    (task=classify's pooled position), else the same share as the output layer (mlm's masked
    positions). The weights' trainability is read once, at construction (after PEFT).
    `forward_only`: the forward pass alone (a distillation teacher's).
    """

    def __init__(self, config: ModelConfig, backbone: nn.Module, head_fraction: float = 1.0,
                 forward_only: bool = False, row_modules: Iterable[str] = (),
                 rows_per_sequence: int | None = None):
        self.config = config
        self._kind = "forward" if forward_only else "forward_backward"
        self.backbone = backbone
        self._hf = bool(getattr(config, "hf_path", None))
        matmul = matmul_weights(backbone, None if self._hf else config)
        self.matmul = {k: (m._replace(weights=m.weights * head_fraction)
                           if _HEAD_MODULES & set(k.split(".")) else m)
                       for k, m in matmul.items()}
        rows = tuple(row_modules)
        forward, backward = matmul_flops(
            m for k, m in self.matmul.items()
            if any(k == r or k.startswith(r + ".") for r in rows))
        # FLOPs per position of the row modules, and the share of positions they run on.
        self._row_flops = forward + (0.0 if forward_only else backward)
        self._rows_per_sequence, self._head_fraction = rows_per_sequence, head_fraction
        # Prompt tuning's soft prompt adds positions in front of each (source) sequence, prefix
        # tuning keys to every self-attention layer: computed, so counted.
        self.prompt_positions, self.prefix_keys = virtual_tokens(backbone)
        self.prefix_cross_keys = self.prefix_keys if _prefixed_cross_attention(backbone) else 0
        # Prefix tuning's reparameterisation MLP on the P virtual tokens: lmlab's once a batch,
        # its first layer again for every attention layer it serves (`PrefixEncoder.layer_kv`);
        # peft's for every sequence (`per_sequence`).
        passes = 1 if forward_only else 3
        self._per_batch, self._per_sequence = 0.0, 0.0
        for name, m in backbone.named_modules():
            parts = name.split(".")
            if not (isinstance(m, nn.Linear) and _VIRTUAL_TOKEN_ENCODERS & set(parts)):
                continue
            flops = 2 * passes * m.weight.numel() * self.prefix_keys
            if self._hf:
                self._per_sequence += flops
            else:
                owner = backbone.get_submodule(".".join(parts[:parts.index("prefix_encoder") + 1]))
                first = name.endswith("mlp.0")
                self._per_batch += flops * (owner.n_slots if first else 1)
        if self._hf:
            # model=hf: the matrix products are the wrapped model's own modules (adapters,
            # frozen weights and the head's share included, as for lmlab models); attention
            # comes from `describe` once, as FLOPs per key, since a `describe` of a large model
            # takes ~0.2 s and padded batches bring new lengths all run long.
            from lmlab.describe import describe  # describe uses this module's arithmetic

            reference = describe(config, backbone)
            self._hf_attention_per_key = (reference["flops_per_token"]["attention"]
                                          / reference["seq_len"])
        # Which backward work runs depends on the model only: worked out once, not per shape
        # (padded batches bring many lengths).
        self._shares = (None if self._hf else side_backward_shares(
            config, self.matmul, self.prefix_keys, self.prefix_cross_keys))
        self._hf_attention_backward = (backward_shares(self.matmul, prefix=bool(self.prefix_keys))
                                       ["self"] if self._hf else 1.0)
        self._cache: dict[tuple[int, int | None], float] = {}

    def batch(self, B: int, T: int, S: int | None = None) -> float:
        key = (T, S)
        if key not in self._cache:
            if self._hf:
                T_run = T + self.prompt_positions
                attention = self._hf_attention_per_key * (T_run + self.prefix_keys)
                mm_forward, mm_backward = matmul_flops(self.matmul.values())
                per_token = mm_forward + attention
                if self._kind == "forward_backward":
                    per_token += mm_backward + 2 * attention * self._hf_attention_backward
                # peft's prompt tuning keeps the virtual positions' logits: all T_run positions.
                self._cache[key] = per_token * T_run + self._per_sequence
            elif self.config.family == "encoder_decoder":
                S = T if S is None else S
                S_run = S + self.prompt_positions  # the soft prompt goes in front of the source
                sides = _side_flops(self.config, self.matmul, T, S_run, self.prefix_keys,
                                    self.prefix_cross_keys, self._shares)
                self._cache[key] = (sides["target"][self._kind] * T
                                    + sides["source"][self._kind] * S_run)
            else:
                T_run = T + self.prompt_positions
                sides = _side_flops(self.config, self.matmul, T_run, prefix_keys=self.prefix_keys,
                                    shares=self._shares)
                # The prompt's states leave before the output layer: it runs on the T tokens.
                self._cache[key] = (sides["target"][self._kind] * T_run
                                    - self._head_flops() * self.prompt_positions
                                    - self._row_flops * (T_run - self._row_positions(T_run)))
        return B * self._cache[key] + self._per_batch

    def _row_positions(self, T: int) -> float:
        """Positions of a T-long sequence the row modules run on."""
        if self._rows_per_sequence is not None:
            return min(self._rows_per_sequence, T)
        return self._head_fraction * T

    def _head_flops(self) -> float:
        """FLOPs per position of the output layer (head_fraction applied)."""
        forward, backward = matmul_flops(v for k, v in self.matmul.items()
                                          if _HEAD_MODULES & set(k.split(".")))
        return forward + (backward if self._kind == "forward_backward" else 0.0)


def _prefixed_cross_attention(backbone: nn.Module) -> bool:
    """Whether prefix tuning also gave the cross-attention layers keys (`cross_attention`)."""
    from lmlab.models.layers.cross_attention import CrossAttention

    return any(isinstance(m, CrossAttention) and getattr(m, "prefix_kv", None) is not None
               for m in backbone.modules())
