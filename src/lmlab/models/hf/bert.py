"""`BertForMaskedLM` -> lmlab encoder (the `bert` preset): post-LN, learned positions, MLM head.

lmlab has no token-type (segment) embeddings: segment 0's vector is constant per position, so
it is folded into the position table (single-segment inputs give the same hidden states; the
second segment of a sentence pair loses its marker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lmlab.models.config import ModelConfig
from lmlab.models.hf.mapping import HFWeights, import_lm_head, require
from lmlab.models.hf.vocab import VocabLayout

ARCHITECTURE = "BertForMaskedLM"
MODEL_TYPE = "bert"


def model_config(hf: dict[str, Any], directory: Path) -> ModelConfig:
    require(hf, directory, ARCHITECTURE, "hidden_act", ["gelu"], "gelu",
            "lmlab's GELU is the exact (erf) one")
    require(hf, directory, ARCHITECTURE, "position_embedding_type", ["absolute"], "absolute")
    require(hf, directory, ARCHITECTURE, "is_decoder", [False], False)
    return ModelConfig(
        family="encoder",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        ffn="gelu",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_position="post",
        position="learned",
        max_seq_len=hf.get("max_position_embeddings", 512),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        mlm_head=True,
        init_std=float(hf.get("initializer_range", 0.02)),
    )


# HF name inside `bert.encoder.layer.{i}.` -> lmlab name inside `encoder.layers.{i}.`
_LAYER = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.up_proj",
    "output.dense": "ffn.down_proj",
    "output.LayerNorm": "ffn_norm",
}
_HEAD = {"cls.predictions.transform.dense": "mlm_transform.dense",
         "cls.predictions.transform.LayerNorm": "mlm_transform.norm"}


def import_weights(w: HFWeights, config: ModelConfig, vocab: VocabLayout) -> dict[str, Tensor]:
    e = "bert.embeddings."
    positions = w(e + "position_embeddings.weight")
    if w.has(e + "token_type_embeddings.weight"):
        positions = positions + w(e + "token_type_embeddings.weight")[0]
    state = {
        "embed_tokens.weight": vocab.place(w(e + "word_embeddings.weight")),
        "encoder.pos_embed.weight": positions,
        "encoder.embed_norm.weight": w(e + "LayerNorm.weight"),
        "encoder.embed_norm.bias": w(e + "LayerNorm.bias"),
    }
    pairs = list(_HEAD.items())
    for i in range(config.n_layers):
        pairs += [(f"bert.encoder.layer.{i}.{a}", f"encoder.layers.{i}.{b}") for a, b in _LAYER.items()]
    for theirs, ours in pairs:
        state[f"{ours}.weight"] = w(f"{theirs}.weight")
        state[f"{ours}.bias"] = w(f"{theirs}.bias")
    bias = "cls.predictions.bias" if w.has("cls.predictions.bias") else "cls.predictions.decoder.bias"
    state["lm_head.bias"] = vocab.place(w(bias))
    state["lm_head.weight"] = import_lm_head(w, state, config, vocab,
                                             "cls.predictions.decoder.weight")
    return state
