"""`T5ForConditionalGeneration` -> lmlab encoder-decoder (the `t5` preset).

Differences folded into the weights: T5 does not scale attention scores by 1/sqrt(d_kv), so
the query projections are multiplied by sqrt(d_kv); T5 v1.0 (tied embeddings) rescales the
decoder output by d_model^-0.5 before the tied output layer, folded into the decoder's final
norm weight. FFN: `relu` (T5 v1.0) and `gated-silu` (SwiGLU) map exactly; `gated-gelu`
(T5 v1.1, Flan-T5) gates with tanh-GELU, which has no lmlab FFN kind, and is rejected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from lmlab.models.config import ModelConfig
from lmlab.models.hf.mapping import HFWeights, unsupported
from lmlab.models.hf.vocab import VocabLayout

ARCHITECTURE = "T5ForConditionalGeneration"
MODEL_TYPE = "t5"
_FFNS = {"relu": "relu", "gated-silu": "swiglu"}


def model_config(hf: dict[str, Any], directory: Path) -> ModelConfig:
    ffn = hf.get("feed_forward_proj", "relu")
    if ffn not in _FFNS:
        raise unsupported(directory, ARCHITECTURE, "feed_forward_proj", ffn, list(_FFNS),
                          "T5 v1.1 / Flan-T5 gate with tanh-GELU, which lmlab has no FFN for")
    d_model, n_heads = hf["d_model"], hf["num_heads"]
    if hf["d_kv"] * n_heads != d_model:
        raise unsupported(directory, ARCHITECTURE, "d_kv", hf["d_kv"], [d_model // n_heads],
                          "lmlab's head_dim is d_model / num_heads")
    n_layers = hf["num_layers"]
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=n_layers,
        n_decoder_layers=hf.get("num_decoder_layers") or n_layers,
        n_heads=n_heads,
        d_ff=hf["d_ff"],
        ffn=_FFNS[ffn],
        norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        norm_position="pre",
        position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        max_seq_len=hf.get("n_positions") or 512,
        dropout=float(hf.get("dropout_rate", 0.1)),
        bias=False,
        tie_embeddings=True,  # import_weights unties when the checkpoint has its own lm_head
    )


def scales_decoder_output(hf: dict[str, Any]) -> bool:
    """transformers 5 records it as `scale_decoder_outputs`; 4 scaled when embeddings were tied."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def has_own_lm_head(w: HFWeights) -> bool:
    """An untied checkpoint (T5 v1.1 saved by transformers 4) stores a distinct lm_head."""
    if not w.has("lm_head.weight"):
        return False
    return not w("lm_head.weight").equal(w("shared.weight"))


def import_weights(w: HFWeights, config: ModelConfig, vocab: VocabLayout,
                   hf: dict[str, Any]) -> dict[str, Tensor]:
    q_scale = math.sqrt(config.head_dim)
    state = {"embed_tokens.weight": vocab.place(w("shared.weight"))}
    ffn = (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")) \
        if config.ffn == "swiglu" else (("wi", "up_proj"), ("wo", "down_proj"))
    n_decoder = config.n_decoder_layers or config.n_layers
    for stack, n in (("encoder", config.n_layers), ("decoder", n_decoder)):
        state[f"{stack}.relative_bias.weight"] = w(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        state[f"{stack}.norm.weight"] = w(f"{stack}.final_layer_norm.weight")
        attentions = [("0.SelfAttention", "attn", "0.layer_norm", "attn_norm")]
        if stack == "decoder":
            attentions.append(("1.EncDecAttention", "cross_attn", "1.layer_norm", "cross_norm"))
        ff = "2" if stack == "decoder" else "1"
        for i in range(n):
            hf_layer, ours = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
            for attn, attn_ours, norm, norm_ours in attentions:
                for p in "qkvo":
                    weight = w(f"{hf_layer}{attn}.{p}.weight")
                    state[f"{ours}{attn_ours}.{p}_proj.weight"] = weight * q_scale if p == "q" else weight
                state[f"{ours}{norm_ours}.weight"] = w(f"{hf_layer}{norm}.weight")
            for theirs, name in ffn:
                state[f"{ours}ffn.{name}.weight"] = w(f"{hf_layer}{ff}.DenseReluDense.{theirs}.weight")
            state[f"{ours}ffn_norm.weight"] = w(f"{hf_layer}{ff}.layer_norm.weight")
    if scales_decoder_output(hf):
        state["decoder.norm.weight"] = state["decoder.norm.weight"] * config.d_model ** -0.5
    if has_own_lm_head(w):
        config.tie_embeddings = False
        state["lm_head.weight"] = vocab.place(w("lm_head.weight"))
    else:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state
