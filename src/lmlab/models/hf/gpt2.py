"""`GPT2LMHeadModel` <-> lmlab decoder (the `gpt` preset): LayerNorm, GELU, learned positions.

GPT-2 stores its projections as `Conv1D` ([in, out], the transpose of a Linear weight) and
fuses q, k and v into one `c_attn`; import transposes and splits, export fuses and transposes.
Its activation `gelu_new` is the tanh approximation of GELU: imported as lmlab's exact `gelu`
(a warning says so; logits then differ by ~1e-3) unless the ModelConfig offers `gelu_tanh`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmlab.models.config import FFNS, ModelConfig
from lmlab.models.hf.mapping import HFWeights, export_error, import_lm_head, require, unsupported
from lmlab.models.hf.vocab import VocabLayout

ARCHITECTURE = "GPT2LMHeadModel"
MODEL_TYPE = "gpt2"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# An exact tanh-GELU FFN kind, if the model zoo has one.
_GELU_TANH = "gelu_tanh" if "gelu_tanh" in FFNS else None


def _ffn_kind(hf: dict[str, Any], directory: Path) -> str:
    act = hf.get("activation_function", "gelu_new")
    if act in ("gelu", "relu"):
        return act
    if act in _TANH_GELUS:
        if _GELU_TANH is not None:
            return _GELU_TANH
        warnings.warn(f"{directory}: GPT-2's activation {act!r} (tanh-approximated GELU) is "
                      "imported as exact GELU; logits differ slightly from the HF model's",
                      stacklevel=3)
        return "gelu"
    raise unsupported(directory, ARCHITECTURE, "activation_function", act,
                      ["gelu", "relu", *_TANH_GELUS])


def model_config(hf: dict[str, Any], directory: Path) -> ModelConfig:
    require(hf, directory, ARCHITECTURE, "scale_attn_weights", [True], True,
            "lmlab always scales attention scores by 1/sqrt(head_dim)")
    require(hf, directory, ARCHITECTURE, "scale_attn_by_inverse_layer_idx", [False], False)
    require(hf, directory, ARCHITECTURE, "add_cross_attention", [False], False)
    d_model = hf["n_embd"]
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d_model,
        ffn=_ffn_kind(hf, directory),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        position="learned",
        max_seq_len=hf.get("n_positions", 1024),
        dropout=float(hf.get("resid_pdrop", 0.1)),
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


_NORMS = {"attn_norm": "ln_1", "ffn_norm": "ln_2"}
# lmlab Linear -> GPT-2 Conv1D (weights transposed)
_CONV1D = {"attn.o_proj": "attn.c_proj", "ffn.up_proj": "mlp.c_fc", "ffn.down_proj": "mlp.c_proj"}


def import_weights(w: HFWeights, config: ModelConfig, vocab: VocabLayout) -> dict[str, Tensor]:
    state = {
        "embed_tokens.weight": vocab.place(w("transformer.wte.weight")),
        "pos_embed.weight": w("transformer.wpe.weight"),
        "norm.weight": w("transformer.ln_f.weight"),
        "norm.bias": w("transformer.ln_f.bias"),
    }
    d = config.d_model
    for i in range(config.n_layers):
        hf, ours = f"transformer.h.{i}.", f"layers.{i}."
        for name, theirs in _NORMS.items():
            state[f"{ours}{name}.weight"] = w(f"{hf}{theirs}.weight")
            state[f"{ours}{name}.bias"] = w(f"{hf}{theirs}.bias")
        qkv_w, qkv_b = w(f"{hf}attn.c_attn.weight"), w(f"{hf}attn.c_attn.bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{ours}attn.{proj}.weight"] = qkv_w[:, j * d:(j + 1) * d].t()
            state[f"{ours}attn.{proj}.bias"] = qkv_b[j * d:(j + 1) * d]
        for name, theirs in _CONV1D.items():
            state[f"{ours}{name}.weight"] = w(f"{hf}{theirs}.weight").t()
            state[f"{ours}{name}.bias"] = w(f"{hf}{theirs}.bias")
    state["lm_head.weight"] = import_lm_head(w, state, config, vocab)
    return state


def check_exportable(config: ModelConfig) -> None:
    if config.norm != "layernorm":
        raise export_error("norm", config.norm, ["layernorm"], ARCHITECTURE)
    allowed = ["gelu", "relu"] + ([_GELU_TANH] if _GELU_TANH else [])
    if config.ffn not in allowed:
        raise export_error("ffn", config.ffn, allowed, ARCHITECTURE)
    if config.kv_heads != config.n_heads:
        raise export_error("n_kv_heads", config.n_kv_heads, [None, config.n_heads], ARCHITECTURE)


def export_config(config: ModelConfig, vocab_rows: int) -> Any:
    import transformers

    activation = {"gelu": "gelu", "relu": "relu", _GELU_TANH: "gelu_new"}[config.ffn]
    hf_config = transformers.GPT2Config(
        vocab_size=vocab_rows,
        n_positions=config.max_seq_len,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.ffn_dim,
        activation_function=activation,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_config.architectures = [ARCHITECTURE]
    return hf_config


def export_weights(state: dict[str, Tensor], config: ModelConfig,
                   vocab: VocabLayout) -> dict[str, Tensor]:
    """lmlab bias=False exports zero biases: GPT-2's Conv1D always has one."""

    def bias(name: str, size: int) -> Tensor:
        found = state.get(name)
        return found if found is not None else torch.zeros(size, dtype=state["norm.weight"].dtype)

    d = config.d_model
    out = {
        "transformer.wte.weight": vocab.extract(state["embed_tokens.weight"]),
        "transformer.wpe.weight": state["pos_embed.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": state["norm.bias"],
    }
    for i in range(config.n_layers):
        hf, ours = f"transformer.h.{i}.", f"layers.{i}."
        for name, theirs in _NORMS.items():
            out[f"{hf}{theirs}.weight"] = state[f"{ours}{name}.weight"]
            out[f"{hf}{theirs}.bias"] = state[f"{ours}{name}.bias"]
        projections = ("q_proj", "k_proj", "v_proj")
        out[f"{hf}attn.c_attn.weight"] = torch.cat(
            [state[f"{ours}attn.{p}.weight"].t() for p in projections], dim=1)
        out[f"{hf}attn.c_attn.bias"] = torch.cat(
            [bias(f"{ours}attn.{p}.bias", d) for p in projections])
        for name, theirs in _CONV1D.items():
            weight = state[f"{ours}{name}.weight"]
            out[f"{hf}{theirs}.weight"] = weight.t()
            out[f"{hf}{theirs}.bias"] = bias(f"{ours}{name}.bias", weight.shape[0])
    if not config.tie_embeddings:
        out["lm_head.weight"] = vocab.extract(state["lm_head.weight"])
    return out
