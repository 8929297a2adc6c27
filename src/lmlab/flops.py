"""Analytic FLOPs of a model: per token for `lmlab describe` (`flops_per_token`), per training
batch of any shape for the throughput callback (`TrainingFlops`). What is counted, and how, is
in `lmlab.describe`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from lmlab.models.accounting import experts_per_token
from lmlab.models.config import ModelConfig

# Prefix tuning's reparameterisation MLP (lmlab's and peft's) and peft's prompt encoder.
_VIRTUAL_TOKEN_ENCODERS = {"prefix_encoder", "prompt_encoder"}


def matmul_weights(backbone: nn.Module, config: ModelConfig | None) -> dict[str, tuple[float, bool]]:
    """Module name -> (weights one token multiplies with, whether they train); `_side`
    sorts the names into source/target for encoder-decoders. MoE experts count by the share
    of experts a token visits; transformers' Conv1D (GPT-2) is a Linear stored transposed."""
    share = 1.0 if config is None else experts_per_token(config) / config.n_experts
    found: dict[str, tuple[float, bool]] = {}
    for name, module in backbone.named_modules():
        if not (isinstance(module, (nn.Linear, nn.Conv1d)) or type(module).__name__ == "Conv1D"):
            continue
        if _VIRTUAL_TOKEN_ENCODERS & set(name.split(".")):
            continue  # runs on the P virtual tokens once per batch, not on every token
        # DeepSpeed ZeRO-3 empties partitioned weights and keeps their size in `ds_numel`.
        numel = getattr(module.weight, "ds_numel", None) or module.weight.numel()
        count = float(numel) * (share if ".experts." in name else 1.0)
        found[name] = (count, bool(module.weight.requires_grad))
    return found


# What peft puts under an adapted Linear (`k_proj.base_layer`, `k_proj.lora_A.default`, ...).
_ADAPTER_PARTS = re.compile(r"\.(base_layer|lora_\w+|lora_magnitude_vector|ia3_\w+)(\.\w+)?$")


def _side(name: str) -> str:
    """encoder_decoder: which tokens a module runs on."""
    name = _ADAPTER_PARTS.sub("", name)
    if name.startswith("encoder.") or (".cross_attn." in name and name.endswith(("k_proj", "v_proj"))):
        return "source"
    return "target"


def attention_keys(config: ModelConfig, T: int, causal: bool) -> int:
    if config.sliding_window is None:
        return T
    reach = config.sliding_window if causal else 2 * config.sliding_window - 1
    return min(T, reach + config.global_tokens)


def _matmul_flops(matmul: Iterable[tuple[float, bool]]) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of (weights, trains) products: the backward is the
    input gradient, plus the weight gradient where the weight trains."""
    matmul = list(matmul)
    return (2 * sum(w for w, _ in matmul),
            sum(2 * w * (2 if trains else 1) for w, trains in matmul))


def _stack_flops(config: ModelConfig, matmul: list[tuple[float, bool]], n_attention: int,
                 keys: int, n_mamba: int, cross_keys: int = 0, n_cross: int = 0) -> dict[str, float]:
    mm_forward, mm_backward = _matmul_flops(matmul)
    per_layer = 4 * config.n_heads * config.head_dim
    attention = per_layer * (n_attention * keys + n_cross * cross_keys)
    scan = n_mamba * (9 * config.d_state + 2) * config.d_inner
    forward = mm_forward + attention + scan
    return {"forward": forward, "forward_backward": forward + mm_backward + 2 * (attention + scan),
            "matmul": mm_forward, "attention": attention, "ssm_scan": scan}


def flops_per_token(config: ModelConfig, matmul: dict[str, tuple[float, bool]], T: int) -> dict[str, Any]:
    if config.family != "encoder_decoder":
        return {k: round(v) for k, v in _side_flops(config, matmul, T)["target"].items()}
    sides = _side_flops(config, matmul, T, T)
    source, target = sides["source"], sides["target"]
    out = {k: round((source[k] + target[k]) / 2) for k in source}
    out["per_source_token"] = {k: round(v) for k, v in source.items()}
    out["per_target_token"] = {k: round(v) for k, v in target.items()}
    return out


def _side_flops(config: ModelConfig, matmul: dict[str, tuple[float, bool]], T: int,
                S: int | None = None, prefix_keys: int = 0,
                prefix_cross_keys: int = 0) -> dict[str, dict[str, float]]:
    """Per-token FLOPs of each side: "target" (a decoder's or encoder's tokens, T of them per
    sequence) and, for encoder_decoder, "source" (S source tokens; the decoder's
    cross-attention scores S keys). `prefix_keys` / `prefix_cross_keys`: keys every
    self-attention / cross-attention layer scores in addition (prefix tuning's virtual keys)."""
    mixers = config.layer_mixers
    if config.family != "encoder_decoder":
        causal = config.family == "decoder"
        keys = attention_keys(config, T, causal) + prefix_keys
        return {"target": _stack_flops(config, list(matmul.values()), mixers.count("attention"),
                                       keys, mixers.count("mamba"))}
    S = T if S is None else S
    n_dec = config.n_decoder_layers or config.n_layers
    source = _stack_flops(config, [v for k, v in matmul.items() if _side(k) == "source"],
                          config.n_layers, attention_keys(config, S, False) + prefix_keys, 0)
    target = _stack_flops(config, [v for k, v in matmul.items() if _side(k) == "target"],
                          n_dec, attention_keys(config, T, True) + prefix_keys, 0,
                          cross_keys=S + prefix_cross_keys, n_cross=n_dec)
    return {"source": source, "target": target}


# Output layers: a task may run them on a share of the positions only (mlm: the masked ones;
# classify: none, its own head is negligible).
_HEAD_MODULES = {"lm_head", "mlm_transform"}


class TrainingFlops:
    """Forward+backward FLOPs of one training batch, by `describe`'s arithmetic, for any
    batch shape: `batch(B, T)` for decoders/encoders, `batch(B, T, S)` for encoder-decoders
    (T target, S source positions). Padded positions count (the hardware computes them).

    `head_fraction` scales the output layer (the share of positions a task runs it on). The
    weights' trainability is read once, at construction (after PEFT). `forward_only`: the
    forward pass alone (a distillation teacher's).
    """

    def __init__(self, config: ModelConfig, backbone: nn.Module, head_fraction: float = 1.0,
                 forward_only: bool = False):
        self.config = config
        self._kind = "forward" if forward_only else "forward_backward"
        self.backbone = backbone
        self._hf = bool(getattr(config, "hf_path", None))
        matmul = matmul_weights(backbone, None if self._hf else config)
        self.matmul = {k: ((w * head_fraction, t) if _HEAD_MODULES & set(k.split(".")) else (w, t))
                       for k, (w, t) in matmul.items()}
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
            self._hf_window = (reference.get("kv_cache") or {}).get("window")
            self._hf_attention_per_key = (reference["flops_per_token"]["attention"]
                                          / self._hf_keys(reference["seq_len"]))
        self._cache: dict[tuple[int, int | None], float] = {}

    def _hf_keys(self, T: int) -> int:
        return min(T, self._hf_window) if self._hf_window else T

    def batch(self, B: int, T: int, S: int | None = None) -> float:
        key = (T, S)
        if key not in self._cache:
            if self._hf:
                T_run = T + self.prompt_positions
                attention = self._hf_attention_per_key * (self._hf_keys(T_run) + self.prefix_keys)
                mm_forward, mm_backward = _matmul_flops(self.matmul.values())
                per_token = mm_forward + attention
                if self._kind == "forward_backward":
                    per_token += mm_backward + 2 * attention
                # peft's prompt tuning keeps the virtual positions' logits: all T_run positions.
                self._cache[key] = per_token * T_run + self._per_sequence
            elif self.config.family == "encoder_decoder":
                S = T if S is None else S
                S_run = S + self.prompt_positions  # the soft prompt goes in front of the source
                sides = _side_flops(self.config, self.matmul, T, S_run, self.prefix_keys,
                                    self.prefix_cross_keys)
                self._cache[key] = (sides["target"][self._kind] * T
                                    + sides["source"][self._kind] * S_run)
            else:
                T_run = T + self.prompt_positions
                sides = _side_flops(self.config, self.matmul, T_run, prefix_keys=self.prefix_keys)
                # The prompt's states leave before the output layer: it runs on the T tokens.
                self._cache[key] = (sides["target"][self._kind] * T_run
                                    - self._head_flops() * self.prompt_positions)
        return B * self._cache[key] + self._per_batch

    def _head_flops(self) -> float:
        """FLOPs per position of the output layer (head_fraction applied)."""
        forward, backward = _matmul_flops(v for k, v in self.matmul.items()
                                          if _HEAD_MODULES & set(k.split(".")))
        return forward + (backward if self._kind == "forward_backward" else 0.0)


def _prefixed_cross_attention(backbone: nn.Module) -> bool:
    """Whether prefix tuning also gave the cross-attention layers keys (`cross_attention`)."""
    from lmlab.models.layers.cross_attention import CrossAttention

    return any(isinstance(m, CrossAttention) and getattr(m, "prefix_kv", None) is not None
               for m in backbone.modules())


def virtual_tokens(backbone: nn.Module) -> tuple[int, int]:
    """(soft-prompt positions, prefix keys) a prompt- or prefix-tuned backbone adds to every
    sequence; (0, 0) for any other."""
    prompt = getattr(backbone, "soft_prompt", None)
    if prompt is not None:
        return int(prompt.n_virtual_tokens), 0
    prefix = getattr(backbone, "prefix_encoder", None)
    if prefix is not None:
        return 0, int(prefix.n_virtual_tokens)
    for module in backbone.modules():  # model=hf: peft's PeftModel inside the HFBackbone
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and getattr(module, "active_adapter", None) in configs:
            config = configs[module.active_adapter]
            n = int(getattr(config, "num_virtual_tokens", 0) or 0)
            kind = str(getattr(config, "peft_type", ""))
            if kind.endswith("PROMPT_TUNING"):
                return n, 0
            if kind.endswith("PREFIX_TUNING"):
                return 0, n
    return 0, 0
