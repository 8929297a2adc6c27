"""Errors a user can cause, raised before any compute and naming the field or file."""

from __future__ import annotations

import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import (
    ByteLevelBPETokenizer,
    TokenizerConfig,
    build_tokenizer,
    check_fits_embedding,
    load_tokenizer,
)
from tests.tokenizers.conftest import HF_FIXTURE


def test_bytelevel_vocab_below_the_byte_alphabet_fails_before_training(monkeypatch):
    monkeypatch.setattr(ByteLevelBPETokenizer, "train", classmethod(lambda *a: pytest.fail()))
    with pytest.raises(ConfigError) as err:
        build_tokenizer({"kind": "bytelevel_bpe", "vocab_size": 261}, ["text"])
    assert err.value.field == "tokenizer.vocab_size" and ">= 262" in str(err.value)
    with pytest.raises(ConfigError, match=">= 263"):
        TokenizerConfig(kind="sentencepiece", vocab_size=200).validate()  # byte fallback


@pytest.mark.parametrize(
    ("config", "needed"),
    [
        ({"kind": "unigram", "vocab_size": 30}, "alphabet of"),
        ({"kind": "wordpiece", "vocab_size": 30}, "continuations"),
        ({"kind": "sentencepiece", "vocab_size": 30, "byte_fallback": False}, "pieces for its"),
    ],
)
def test_vocab_below_the_training_alphabet_names_the_minimum(config, needed, shakespeare):
    with pytest.raises(ConfigError) as err:
        build_tokenizer(config, [shakespeare[:20_000]])
    assert err.value.field == "tokenizer.vocab_size"
    assert needed in str(err.value) and "valid: an integer >=" in str(err.value)


@pytest.mark.parametrize("kind", ["bytelevel_bpe", "wordpiece", "unigram", "sentencepiece"])
@pytest.mark.parametrize("texts", [None, [""], lambda: iter([])])
def test_no_training_text_is_a_data_error(kind, texts, tmp_path):
    with pytest.raises(DataError, match="no training text for the tokenizer"):
        build_tokenizer({"kind": kind}, texts, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"kind": "hf"}, "tokenizer.path"),
        ({"kind": "bpe", "path": "x.json"}, "tokenizer.path"),
        ({"kind": "hf", "path": "x", "lowercase": True}, "tokenizer.lowercase"),
        ({"kind": "sentencepiece", "path": "m.model", "digits": "split"}, "tokenizer.digits"),
        ({"kind": "sentencepiece", "digits": "group_l2r"}, "tokenizer.digits"),
        ({"kind": "sentencepiece", "normalization": "nfd"}, "tokenizer.normalization"),
        (
            {"kind": "sentencepiece", "normalization": "none", "lowercase": True},
            "tokenizer.lowercase",
        ),
        ({"kind": "bpe", "digits": "threes"}, "tokenizer.digits"),
        ({"kind": "bpe", "normalization": "NFKC"}, "tokenizer.normalization"),
        ({"kind": "bpe", "special_tokens": ["<eos>"]}, "tokenizer.special_tokens"),
        ({"kind": "bpe", "special_tokens": ["<a>", "<a>"]}, "tokenizer.special_tokens"),
        ({"kind": "bpe", "special_tokens": "<a>"}, "tokenizer.special_tokens"),
        ({"kind": "bpe", "stochastok": "lots"}, "tokenizer.stochastok"),
        ({"kind": "sentencepiece", "character_coverage": 0}, "tokenizer.character_coverage"),
        ({"kind": "sentencepiece", "model_type": "word"}, "tokenizer.model_type"),
    ],
)
def test_bad_new_fields_name_the_field(config, field):
    with pytest.raises(ConfigError) as err:
        TokenizerConfig.from_dict(config)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_missing_or_corrupt_hf_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer file") as err:
        build_tokenizer({"kind": "hf", "path": str(tmp_path / "nope.json")})
    assert err.value.path.endswith("nope.json")
    with pytest.raises(DataError, match="no tokenizer.json in this folder"):
        build_tokenizer({"kind": "hf", "path": str(tmp_path)})
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(DataError, match="tokenizer=sentencepiece"):
        build_tokenizer({"kind": "hf", "path": str(tmp_path)})
    broken = tmp_path / "tokenizer.json"
    broken.write_text(HF_FIXTURE.read_text(encoding="utf-8")[:500], encoding="utf-8")
    with pytest.raises(DataError, match="not a valid `tokenizers` file") as err:
        build_tokenizer({"kind": "hf", "path": str(broken)})
    assert err.value.path == str(broken)


def test_missing_or_corrupt_sentencepiece_models_are_data_errors(tmp_path, shakespeare):
    with pytest.raises(DataError, match="no such SentencePiece model"):
        build_tokenizer({"kind": "sentencepiece", "path": str(tmp_path / "m.model")})
    (tmp_path / "m.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        build_tokenizer({"kind": "sentencepiece", "path": str(tmp_path / "m.model")})
    tok = build_tokenizer({"kind": "sentencepiece", "vocab_size": 400}, [shakespeare[:20_000]])
    saved = tok.save(tmp_path / "saved")
    (saved / "sentencepiece.model.b64").write_text("!!", encoding="utf-8")
    with pytest.raises(DataError, match="checksum"):
        load_tokenizer(saved)


def test_a_vocabulary_larger_than_the_embedding_is_a_config_error(shakespeare):
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 300}, [shakespeare[:20_000]])
    check_fits_embedding(tok, 320, "init_from=run/last.ckpt")  # padded to a multiple of 64
    with pytest.raises(ConfigError) as err:
        check_fits_embedding(tok, 256, "init_from=run/last.ckpt")
    assert err.value.field == "tokenizer"
    assert "300 tokens" in str(err.value) and "256-row embedding of init_from" in str(err.value)
