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
        sliding window is a mask over the T keys, so it is not discounted either (its KV cache
        below does keep W positions only); cross-attention scores S = T source keys
      + ssm_scan: (9·d_state + 2)·d_inner per Mamba layer (mamba_ssm's selective-scan count:
        discretise, update, read out, plus the D skip and the z gate; lmlab's chunked scan
        does its own, different, arithmetic).
  Biases, norms, activations and softmax are not counted (O(d) per token, under 1%).
  forward_backward = forward + backward, backward = 2·forward for attention and scan, and for
  each matmul its input gradient (= its forward) plus its weight gradient (= its forward) when
  the weight trains: 3·forward for a fully trained model, less under PEFT, where autograd
  computes no gradient below the lowest trainable parameter (`lmlab.gradient_flow`:
  a frozen backbone under a classifier head runs forward only).
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
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.flops import (
    attention_keys,
    backward_shares,
    flops_per_token,
    matmul_flops,
    matmul_weights,
)
from lmlab.gradient_flow import virtual_tokens
from lmlab.models.accounting import parameter_report
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
    matmul = matmul_weights(backbone, config)
    params["matmul_per_token"] = round(sum(m.weights for m in matmul.values()))
    return {
        "family": config.family,
        "seq_len": T,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "parameters": params,
        "flops_per_token": flops_per_token(config, matmul, T),
        "kv_cache": _kv_cache(config, T),
        "ssm_state": _ssm_state(config),
        "layers": layer_plan(config),
    }


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
            # The products of the wrapped model as it trains (PEFT: adapters, frozen weights,
            # gradients starting at the lowest trainable parameter; its own vocabulary rows);
            # the lmlab equivalent above is a fully trained model.
            flops = out["flops_per_token"]
            flops.update(_wrapped_flops(backbone, matmul_weights(backbone, None),
                                        flops["attention"], flops["ssm_scan"]))
        out["hf_architecture"] = architecture
        return out
    if backbone is None:
        with torch.device("meta"):
            backbone = HFBackbone(config, path=hf_path)
    total = sum(p.numel() for p in backbone.parameters())
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    matmul = matmul_weights(backbone, None)
    T = seq_len or hf.get("max_position_embeddings") or hf.get("n_positions") or config.max_seq_len
    n_layers = hf.get("num_hidden_layers") or hf.get("n_layer") or 0
    heads = hf.get("num_attention_heads") or hf.get("n_head") or 1
    width = hf.get("hidden_size") or hf.get("n_embd") or 0
    head_dim = hf.get("head_dim") or width // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    window = hf.get("sliding_window")
    keys = min(T, window) if window else T  # what the KV cache keeps; scores cover all T
    attention = 4 * heads * head_dim * T * n_layers
    kv = 2 * kv_heads * head_dim * n_layers
    return {
        "family": "decoder", "seq_len": T, "hf_architecture": (hf.get("architectures") or [None])[0],
        "vocab_size": config.vocab_size,
        "padded_vocab_size": backbone.hf.get_input_embeddings().weight.shape[0],
        "parameters": {"total": total, "trainable": trainable, "active_per_token": total,
                       "embedding": sum(m.weight.numel() for m in backbone.modules()
                                        if isinstance(m, _EMBEDDING_TYPES)),
                       "matmul_per_token": round(sum(m.weights for m in matmul.values()))},
        "flops_per_token": _wrapped_flops(backbone, matmul, attention),
        "kv_cache": {"attention_layers": n_layers, "window": window,
                     "bytes_per_token": {k: kv * b for k, b in BYTES.items()},
                     "bytes_at_seq_len": {k: kv * b * keys for k, b in BYTES.items()}},
        "ssm_state": None,
        "layers": [{"stack": "decoder", "layer": i, "mixer": "attention", "attention": "causal",
                    "heads": f"{heads}q/{kv_heads}kv", "window": window, "ffn": "(hf)"}
                   for i in range(n_layers)],
    }


def _wrapped_flops(backbone: nn.Module, matmul: dict[str, Any], attention: float,
                   scan: float = 0) -> dict[str, Any]:
    """model=hf's FLOPs per token from the wrapped model's own products (`matmul_weights`) as
    it trains, with `attention` and `scan` per token: the backward only where gradients flow."""
    shares = backward_shares(matmul, prefix=virtual_tokens(backbone)[1] > 0)
    mm_forward, mm_backward = matmul_flops(matmul.values())
    forward = mm_forward + attention + scan
    return {"forward": round(forward),
            "forward_backward": round(forward + mm_backward
                                      + 2 * (attention * shares["self"] + scan)),
            "matmul": round(mm_forward), "attention": attention, "ssm_scan": scan}


# ---- caches -----------------------------------------------------------------------------------

def _kv_cache(config: ModelConfig, T: int) -> dict[str, Any] | None:
    if config.family == "encoder":
        return None
    per_layer = 2 * config.kv_heads * config.head_dim  # elements per token
    if config.family == "encoder_decoder":
        n = config.n_decoder_layers or config.n_layers
        cached = attention_keys(config, T, True)
        return {
            "attention_layers": n,
            "bytes_per_token": {k: per_layer * n * b for k, b in BYTES.items()},
            "cross_attention_bytes_per_source_token": {k: per_layer * n * b for k, b in BYTES.items()},
            "bytes_at_seq_len": {k: per_layer * n * b * (cached + T) for k, b in BYTES.items()},
        }
    n = config.layer_mixers.count("attention")
    if n == 0:
        return None
    cached = attention_keys(config, T, True)
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
