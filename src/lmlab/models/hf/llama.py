"""`LlamaForCausalLM` <-> lmlab decoder (the `gqa` / `mqa` presets): RMSNorm, SwiGLU, RoPE.

Both use the rotate-half RoPE layout and the same projection names, so the weights map one to
one; GQA is `num_key_value_heads` = `n_kv_heads`. RoPE: default and linear scaling map exactly;
the other HF rope types (dynamic, yarn, llama3, longrope) compute different frequencies than
lmlab's and are rejected rather than imported approximately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lmlab.models.config import ModelConfig
from lmlab.models.hf.mapping import HFWeights, export_error, import_lm_head, require, unsupported
from lmlab.models.hf.vocab import VocabLayout

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
_ROPE_TYPES = {"default": "none", "linear": "linear"}


def rope_settings(hf: dict[str, Any], directory: Path) -> tuple[float, str, float]:
    """(theta, lmlab rope_scaling, factor) from transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind not in _ROPE_TYPES:
        raise unsupported(directory, ARCHITECTURE, "rope_type", kind, list(_ROPE_TYPES),
                          "lmlab's ntk/yarn scaling computes different frequencies than HF's")
    factor = float(params.get("factor", legacy.get("factor", 1.0)))
    return theta, _ROPE_TYPES[kind], factor


def model_config(hf: dict[str, Any], directory: Path) -> ModelConfig:
    require(hf, directory, ARCHITECTURE, "hidden_act", ["silu"], "silu",
            "lmlab's gated FFN is SwiGLU")
    attention_bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != attention_bias:
        raise unsupported(directory, ARCHITECTURE, "mlp_bias", hf.get("mlp_bias"),
                          [attention_bias], "lmlab's `bias` switches every Linear's bias at once")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise unsupported(directory, ARCHITECTURE, "head_dim", head_dim, [d_model // n_heads],
                          "lmlab's head_dim is d_model / n_heads")
    theta, scaling, factor = rope_settings(hf, directory)
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        ffn="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_scaling_factor=factor,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        dropout=float(hf.get("attention_dropout", 0.0)),
        bias=attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


# lmlab name inside a layer -> HF name inside `model.layers.{i}.`
_LAYER_LINEARS = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "ffn.gate_proj": "mlp.gate_proj",
    "ffn.up_proj": "mlp.up_proj",
    "ffn.down_proj": "mlp.down_proj",
}
_LAYER_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def import_weights(w: HFWeights, config: ModelConfig, vocab: VocabLayout) -> dict[str, Tensor]:
    state = {"embed_tokens.weight": vocab.place(w("model.embed_tokens.weight")),
             "norm.weight": w("model.norm.weight")}
    for i in range(config.n_layers):
        for ours, theirs in _LAYER_LINEARS.items():
            state[f"layers.{i}.{ours}.weight"] = w(f"model.layers.{i}.{theirs}.weight")
            if config.bias:
                state[f"layers.{i}.{ours}.bias"] = w(f"model.layers.{i}.{theirs}.bias")
        for ours, theirs in _LAYER_NORMS.items():
            state[f"layers.{i}.{ours}.weight"] = w(f"model.layers.{i}.{theirs}.weight")
    state["lm_head.weight"] = import_lm_head(w, state, config, vocab)
    return state


def check_exportable(config: ModelConfig) -> None:
    if config.norm != "rmsnorm":
        raise export_error("norm", config.norm, ["rmsnorm"], ARCHITECTURE)
    if config.ffn != "swiglu":
        raise export_error("ffn", config.ffn, ["swiglu"], ARCHITECTURE)
    if config.rope_scaling not in ("none", "linear"):
        raise export_error("rope_scaling", config.rope_scaling, ["none", "linear"], ARCHITECTURE)


def export_config(config: ModelConfig, vocab_rows: int) -> Any:
    """A `transformers.LlamaConfig` describing `config` exactly."""
    import transformers

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": config.rope_theta,
                "factor": config.rope_scaling_factor}
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_rows,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.dropout,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x: rope_theta + rope_scaling
        kwargs["rope_theta"] = config.rope_theta
        if config.rope_scaling == "linear":
            kwargs["rope_scaling"] = {"type": "linear", "factor": config.rope_scaling_factor}
    hf_config = transformers.LlamaConfig(**kwargs)
    hf_config.architectures = [ARCHITECTURE]
    return hf_config


def export_weights(state: dict[str, Tensor], config: ModelConfig,
                   vocab: VocabLayout) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": vocab.extract(state["embed_tokens.weight"]),
           "model.norm.weight": state["norm.weight"]}
    for i in range(config.n_layers):
        for ours, theirs in _LAYER_LINEARS.items():
            out[f"model.layers.{i}.{theirs}.weight"] = state[f"layers.{i}.{ours}.weight"]
            if config.bias:
                out[f"model.layers.{i}.{theirs}.bias"] = state[f"layers.{i}.{ours}.bias"]
        for ours, theirs in _LAYER_NORMS.items():
            out[f"model.layers.{i}.{theirs}.weight"] = state[f"layers.{i}.{ours}.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = vocab.extract(state["lm_head.weight"])
    return out
