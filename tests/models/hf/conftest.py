"""Tiny random Hugging Face models, saved once per session to temp dirs (no hub, no network)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")

# Vocabulary of the tiny models; not a multiple of 64, so lmlab pads it.
VOCAB = 99


def _llama(tie: bool = False, rope_scaling: dict | None = None, **kw):
    rope = {"rope_type": "default", "rope_theta": 5000.0, **(rope_scaling or {})}
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters=rope, tie_word_embeddings=tie, **kw)
    return transformers.LlamaForCausalLM(config)


def _gpt2(activation: str = "gelu"):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        activation_function=activation, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=40)
    return transformers.BertForMaskedLM(config)


def _t5(feed_forward_proj: str = "relu"):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


def _neox():
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)
    return transformers.GPTNeoXForCausalLM(config)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama,
    "llama_tied": lambda: _llama(tie=True),
    "llama_linear_rope": lambda: _llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_yarn": lambda: _llama(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
    "gpt2": _gpt2,
    "gpt2_gelu_new": lambda: _gpt2("gelu_new"),
    "bert": _bert,
    "t5": _t5,
    "t5_gated_silu": lambda: _t5("gated-silu"),
    "t5_gated_gelu": lambda: _t5("gated-gelu"),
    "neox": _neox,
}


def write_word_tokenizer(directory: Path, words: list[str], specials: dict[str, str]) -> None:
    """A WordLevel tokenizer.json (+ special_tokens_map.json) like a saved HF tokenizer's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token", words[0])))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(name) -> (the HF model in eval mode, the directory it is saved in)."""
    made: dict[str, tuple[torch.nn.Module, Path]] = {}

    def _get(name: str) -> tuple[torch.nn.Module, Path]:
        if name not in made:
            torch.manual_seed(0)
            model = BUILDERS[name]().eval()
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(str(directory))
            made[name] = (model, directory)
        return made[name]

    return _get
