"""`lmlab describe`: what a model config costs, computed without training.

    d = describe(ModelConfig(...), seq_len=256)     # plain, JSON-serialisable dict
    print(format_description(d))

Numbers (T = `seq_len`, default `max_seq_len`; all per token unless said otherwise):

- parameters: total and trainable (a tied weight once), active per token (MoE: the non-expert
  parameters + `experts_per_token` experts per MoE layer; `models.accounting.parameter_report`),
  embedding (lookup tables: token, position, relative-bias), and matmul = the weights one token
  is multiplied with (every Linear / Conv1d, the output layer included, experts weighted by
  experts_per_token / n_experts).
- flops_per_token, forward = 2·matmul
      + attention: 4·n_heads·head_dim·S per attention layer (QK^T and AV, 2 flops per MAC),
        S = keys a query is scored against: T (causal masking is not discounted: the PaLM /
        nanoGPT MFU convention, and what `FlopCounterMode` counts for attention's matmuls -- on
        CPU it does not see SDPA's fused kernel at all, so compare with attn_impl=eager); a
        sliding window W caps S at W (+ global tokens), 2W-1 bidirectional; cross-attention
        scores S = T source keys
      + ssm_scan: (9·d_state + 2)·d_inner per Mamba layer (mamba_ssm's selective-scan count:
        discretise, update, read out, plus the D skip and the z gate; lmlab's chunked scan
        does its own, different, arithmetic).
  Biases, norms, activations and softmax are not counted (O(d) per token, under 1%).
  forward_backward = forward + backward, backward = 2·forward for attention and scan, and for
  each matmul its input gradient (= its forward) plus its weight gradient (= its forward) when
  the weight trains: 3·forward for a fully trained model, less under PEFT.
  encoder_decoder: `per_source_token` (encoder, and the decoder's cross-attention K/V
  projections) and `per_target_token` (decoder, output layer); the headline number is their
  mean, i.e. per token of a T-source + T-target pair. Encoders count the MLM head at every
  position (the mlm task evaluates it at the masked 15% only).
- model=hf (`hf_path`): an architecture lmlab imports is described as its lmlab equivalent
  (same arithmetic); any other causal LM by its Linear/Conv1D weights and config.json sizes.
- kv_cache: bytes one generated token adds to the cache, 2 (K and V)·n_kv_heads·head_dim per
  attention layer (GQA/MQA shrink it by n_heads/n_kv_heads), in 16-bit and fp32, and the cache
  at T (a sliding-window layer keeps only W positions). encoder_decoder adds the cross-attention
  memory, bytes per source token. Encoders have no cache.
- ssm_state: bytes of a Mamba layer's recurrent state per sequence, constant in T: the conv
  inputs d_inner·(d_conv-1) in the model dtype, the SSM state d_inner·d_state in fp32.
- layers: the plan, one row per block: stack, mixer, attention kind/heads/window, FFN.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.accounting import experts_per_token, parameter_report
from lmlab.models.builder import build_backbone
from lmlab.models.config import ModelConfig

BYTES = {"16bit": 2, "fp32": 4}
_EMBEDDING_TYPES = (nn.Embedding,)


def describe(config: ModelConfig, backbone: nn.Module | None = None, seq_len: int | None = None,
             vocab_size: int | None = None) -> dict[str, Any]:
    """The numbers of the module docstring. `backbone` (e.g. after PEFT) gives the trainable
    counts; without it one is built on the meta device (no memory, no init). `vocab_size`
    fills in a config whose tokenizer is not known yet (`vocab_size=0`)."""
    if vocab_size is not None and not config.vocab_size:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    hf_path = getattr(config, "hf_path", None)
    if hf_path:
        return _describe_hf(dataclasses.replace(config), str(hf_path), backbone, seq_len)
    if not config.vocab_size:
        raise ConfigError("model.vocab_size", config.vocab_size, "an integer > 0",
                          "describe needs the vocabulary size (the tokenizer's); pass one")
    T = seq_len or config.max_seq_len
    if backbone is None:
        with torch.device("meta"):
            backbone = build_backbone(config)
    params = parameter_report(backbone, config)
    params["embedding"] = sum(m.weight.numel() for m in backbone.modules()
                              if isinstance(m, _EMBEDDING_TYPES))
    matmul = _matmul_weights(backbone, config)
    params["matmul_per_token"] = round(sum(w for w, _ in matmul.values()))
    return {
        "family": config.family,
        "seq_len": T,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "parameters": params,
        "flops_per_token": _flops(config, matmul, T),
        "kv_cache": _kv_cache(config, T),
        "ssm_state": _ssm_state(config),
        "layers": layer_plan(config),
    }


# ---- FLOPs ------------------------------------------------------------------------------------

# Prefix tuning's reparameterisation MLP (lmlab's and peft's) and peft's prompt encoder.
_VIRTUAL_TOKEN_ENCODERS = {"prefix_encoder", "prompt_encoder"}


def _matmul_weights(backbone: nn.Module, config: ModelConfig | None) -> dict[str, tuple[float, bool]]:
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


def _attention_keys(config: ModelConfig, T: int, causal: bool) -> int:
    if config.sliding_window is None:
        return T
    reach = config.sliding_window if causal else 2 * config.sliding_window - 1
    return min(T, reach + config.global_tokens)


def _stack_flops(config: ModelConfig, matmul: list[tuple[float, bool]], n_attention: int,
                 keys: int, n_mamba: int, cross_keys: int = 0, n_cross: int = 0) -> dict[str, float]:
    mm_forward = 2 * sum(w for w, _ in matmul)
    mm_backward = sum(2 * w * (2 if trains else 1) for w, trains in matmul)
    per_layer = 4 * config.n_heads * config.head_dim
    attention = per_layer * (n_attention * keys + n_cross * cross_keys)
    scan = n_mamba * (9 * config.d_state + 2) * config.d_inner
    forward = mm_forward + attention + scan
    return {"forward": forward, "forward_backward": forward + mm_backward + 2 * (attention + scan),
            "matmul": mm_forward, "attention": attention, "ssm_scan": scan}


def _flops(config: ModelConfig, matmul: dict[str, tuple[float, bool]], T: int) -> dict[str, Any]:
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
        keys = _attention_keys(config, T, causal) + prefix_keys
        return {"target": _stack_flops(config, list(matmul.values()), mixers.count("attention"),
                                       keys, mixers.count("mamba"))}
    S = T if S is None else S
    n_dec = config.n_decoder_layers or config.n_layers
    source = _stack_flops(config, [v for k, v in matmul.items() if _side(k) == "source"],
                          config.n_layers, _attention_keys(config, S, False) + prefix_keys, 0)
    target = _stack_flops(config, [v for k, v in matmul.items() if _side(k) == "target"],
                          n_dec, _attention_keys(config, T, True) + prefix_keys, 0,
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
        matmul = _matmul_weights(backbone, None if self._hf else config)
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
                mm = self.matmul.values()
                per_token = sum(2 * w for w, _ in mm) + attention
                if self._kind == "forward_backward":
                    per_token += sum(2 * w * (2 if t else 1) for w, t in mm) + 2 * attention
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
        head = [v for k, v in self.matmul.items() if _HEAD_MODULES & set(k.split("."))]
        backward = self._kind == "forward_backward"
        return sum(2 * w + (2 * w * (2 if t else 1) if backward else 0) for w, t in head)


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


def _describe_hf(config: ModelConfig, hf_path: str, backbone: nn.Module | None,
                 seq_len: int | None) -> dict[str, Any]:
    """model=hf: as its lmlab equivalent when lmlab imports the architecture, else generic.
    T defaults to the HF model's context (max_position_embeddings)."""
    from lmlab.models.hf import architecture_of, hf_model_config
    from lmlab.models.hf.files import read_config
    from lmlab.models.hf_backbone import HFBackbone

    hf = read_config(hf_path, "model.hf_path")
    try:
        architecture = architecture_of(hf, hf_path, "model.hf_path")
    except ConfigError:
        architecture = None
    if architecture is not None:
        mapped = hf_model_config(hf_path, "model.hf_path")
        mapped.vocab_size = config.vocab_size or mapped.vocab_size
        out = describe(mapped, seq_len=seq_len)
        if backbone is not None:
            out["parameters"].update(total=sum(p.numel() for p in backbone.parameters()),
                                     trainable=sum(p.numel() for p in backbone.parameters()
                                                   if p.requires_grad))
        out["hf_architecture"] = architecture
        return out
    if backbone is None:
        with torch.device("meta"):
            backbone = HFBackbone(config, path=hf_path)
    total = sum(p.numel() for p in backbone.parameters())
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    matmul = _matmul_weights(backbone, None)
    T = seq_len or hf.get("max_position_embeddings") or hf.get("n_positions") or config.max_seq_len
    n_layers = hf.get("num_hidden_layers") or hf.get("n_layer") or 0
    heads = hf.get("num_attention_heads") or hf.get("n_head") or 1
    width = hf.get("hidden_size") or hf.get("n_embd") or 0
    head_dim = hf.get("head_dim") or width // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    window = hf.get("sliding_window")
    keys = min(T, window) if window else T
    mm = [v for v in matmul.values()]
    attention = 4 * heads * head_dim * keys * n_layers
    forward = 2 * sum(w for w, _ in mm) + attention
    backward = sum(2 * w * (2 if trains else 1) for w, trains in mm) + 2 * attention
    kv = 2 * kv_heads * head_dim * n_layers
    return {
        "family": "decoder", "seq_len": T, "hf_architecture": (hf.get("architectures") or [None])[0],
        "vocab_size": config.vocab_size,
        "padded_vocab_size": backbone.hf.get_input_embeddings().weight.shape[0],
        "parameters": {"total": total, "trainable": trainable, "active_per_token": total,
                       "embedding": sum(m.weight.numel() for m in backbone.modules()
                                        if isinstance(m, _EMBEDDING_TYPES)),
                       "matmul_per_token": round(sum(w for w, _ in mm))},
        "flops_per_token": {"forward": round(forward), "forward_backward": round(forward + backward),
                            "matmul": round(forward - attention), "attention": attention,
                            "ssm_scan": 0},
        "kv_cache": {"attention_layers": n_layers, "window": window,
                     "bytes_per_token": {k: kv * b for k, b in BYTES.items()},
                     "bytes_at_seq_len": {k: kv * b * keys for k, b in BYTES.items()}},
        "ssm_state": None,
        "layers": [{"stack": "decoder", "layer": i, "mixer": "attention", "attention": "causal",
                    "heads": f"{heads}q/{kv_heads}kv", "window": window, "ffn": "(hf)"}
                   for i in range(n_layers)],
    }


# ---- caches -----------------------------------------------------------------------------------

def _kv_cache(config: ModelConfig, T: int) -> dict[str, Any] | None:
    if config.family == "encoder":
        return None
    per_layer = 2 * config.kv_heads * config.head_dim  # elements per token
    if config.family == "encoder_decoder":
        n = config.n_decoder_layers or config.n_layers
        cached = _attention_keys(config, T, True)
        return {
            "attention_layers": n,
            "bytes_per_token": {k: per_layer * n * b for k, b in BYTES.items()},
            "cross_attention_bytes_per_source_token": {k: per_layer * n * b for k, b in BYTES.items()},
            "bytes_at_seq_len": {k: per_layer * n * b * (cached + T) for k, b in BYTES.items()},
        }
    n = config.layer_mixers.count("attention")
    if n == 0:
        return None
    cached = _attention_keys(config, T, True)
    return {
        "attention_layers": n,
        "window": config.sliding_window,
        "bytes_per_token": {k: per_layer * n * b for k, b in BYTES.items()},
        "bytes_at_seq_len": {k: per_layer * n * b * cached for k, b in BYTES.items()},
    }


def _ssm_state(config: ModelConfig) -> dict[str, Any] | None:
    n = config.layer_mixers.count("mamba") if config.family == "decoder" else 0
    if n == 0:
        return None
    conv = config.d_inner * (config.d_conv - 1)
    ssm = config.d_inner * config.d_state
    return {"mamba_layers": n,
            "bytes_per_sequence": {k: n * (conv * b + ssm * 4) for k, b in BYTES.items()}}


# ---- layer plan -------------------------------------------------------------------------------

def _ffn_name(config: ModelConfig, index: int) -> str:
    if config.ffn == "none":
        return "none"
    if config.is_moe_layer(index):
        return (f"moe {config.n_experts}x{config.expert_ffn} top{config.top_k} "
                f"({config.router}) d_ff={config.ffn_dim}")
    return f"{config.ffn_kind} d_ff={config.ffn_dim}"


def layer_plan(config: ModelConfig) -> list[dict[str, Any]]:
    heads = f"{config.n_heads}q/{config.kv_heads}kv"
    stacks: list[tuple[str, int, bool, bool]]
    if config.family == "encoder_decoder":
        stacks = [("encoder", config.n_layers, False, False),
                  ("decoder", config.n_decoder_layers or config.n_layers, True, True)]
    else:
        stacks = [(config.family, config.n_layers, config.family == "decoder", False)]
    rows = []
    for stack, n, causal, cross in stacks:
        mixers = config.layer_mixers if stack == "decoder" and not cross else ["attention"] * n
        for i in range(n):
            row: dict[str, Any] = {"stack": stack, "layer": i, "mixer": mixers[i]}
            if mixers[i] == "attention":
                row["attention"] = ("causal" if causal else "bidirectional") + (
                    " + cross" if cross else "")
                row["heads"] = heads
                row["window"] = config.sliding_window
            else:
                row["attention"], row["heads"], row["window"] = None, None, None
                row["ssm"] = f"d_inner={config.d_inner} d_state={config.d_state}"
            row["ffn"] = _ffn_name(config, i)
            rows.append(row)
    return rows


# ---- text -------------------------------------------------------------------------------------

def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def format_description(d: dict[str, Any]) -> str:
    """A readable report of `describe`'s dict."""
    p, f = d["parameters"], d["flops_per_token"]
    lines = [f"family {d['family']}, vocab {d['vocab_size']} (padded {d['padded_vocab_size']}), "
             f"context T={d['seq_len']}", "", "parameters"]
    for key in ("total", "trainable", "active_per_token", "embedding", "matmul_per_token"):
        lines.append(f"  {key:<28}{p[key]:>16,}  ({_human(p[key])})")
    lines += ["", "FLOPs per token (forward+backward = training)"]
    for key in ("forward_backward", "forward", "matmul", "attention", "ssm_scan"):
        lines.append(f"  {key:<28}{f[key]:>16,}  ({_human(f[key], 'FLOP')})")
    for side in ("per_source_token", "per_target_token"):
        if side in f:
            lines.append(f"  {side + ' fwd+bwd':<28}{f[side]['forward_backward']:>16,}")
    kv, ssm = d["kv_cache"], d["ssm_state"]
    lines += ["", "inference state"]
    if kv is None and ssm is None:
        lines.append("  none (no autoregressive cache)")
    if kv is not None:
        per, at = kv["bytes_per_token"], kv["bytes_at_seq_len"]
        lines.append(f"  KV cache per token          {_bytes(per['16bit'])} (16-bit), "
                     f"{_bytes(per['fp32'])} (fp32)")
        lines.append(f"  KV cache at T={d['seq_len']:<13}{_bytes(at['16bit'])} (16-bit), "
                     f"{_bytes(at['fp32'])} (fp32) per sequence")
        if "cross_attention_bytes_per_source_token" in kv:
            cross = kv["cross_attention_bytes_per_source_token"]
            lines.append(f"  cross-attn memory / src tok {_bytes(cross['16bit'])} (16-bit)")
    if ssm is not None:
        per = ssm["bytes_per_sequence"]
        lines.append(f"  SSM state per sequence      {_bytes(per['16bit'])} (16-bit conv), "
                     f"{_bytes(per['fp32'])} (fp32), constant in T")
    lines += ["", "layers"]
    header = ("stack", "layer", "mixer", "attention", "heads", "window", "ffn")
    table = [header] + [tuple("-" if r.get(k) is None else str(r.get(k)) for k in header)
                        for r in d["layers"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
