from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.tokenizers import TOKENIZER_KINDS, TokenizerConfig, build_tokenizer


def test_defaults_are_valid_and_round_trip_through_dict():
    config = TokenizerConfig()
    assert config.validate() is config
    assert TokenizerConfig.from_dict(config.to_dict()) == config


def test_from_dict_accepts_omegaconf():
    node = OmegaConf.create({"kind": "bpe", "vocab_size": 512, "lowercase": True})
    config = TokenizerConfig.from_dict(node)
    assert config == TokenizerConfig(kind="bpe", vocab_size=512, lowercase=True)


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        TokenizerConfig(kind="sentencepeace").validate()
    assert err.value.field == "tokenizer.kind"
    for kind in TOKENIZER_KINDS:
        assert kind in str(err.value)


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        TokenizerConfig.from_dict({"kind": "bpe", "vocab": 100})
    assert err.value.field == "tokenizer.vocab"
    for name in ("kind", "vocab_size", "min_frequency", "lowercase"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "bpe", "vocab_size": 6}, "tokenizer.vocab_size"),
        ({"kind": "word", "vocab_size": 0}, "tokenizer.vocab_size"),
        ({"kind": "word", "vocab_size": True}, "tokenizer.vocab_size"),
        ({"kind": "bpe", "vocab_size": "1024"}, "tokenizer.vocab_size"),
        ({"kind": "word", "min_frequency": 0}, "tokenizer.min_frequency"),
        ({"kind": "bpe", "lowercase": "yes"}, "tokenizer.lowercase"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        TokenizerConfig.from_dict(overrides)
    assert err.value.field == field
    assert str(err.value).startswith(field)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_vocab_size_is_ignored_where_the_alphabet_is_fixed(kind):
    TokenizerConfig(kind=kind, vocab_size=3).validate()


def test_bpe_vocab_below_the_alphabet_names_the_alphabet_size(shakespeare):
    alphabet = len(set(shakespeare))  # spaces become "▁", which the text does not contain
    with pytest.raises(ConfigError) as err:
        build_tokenizer({"kind": "bpe", "vocab_size": 40}, [shakespeare])
    assert err.value.field == "tokenizer.vocab_size"
    assert f"alphabet of {alphabet} characters" in str(err.value)
    assert str(alphabet + 6) in str(err.value)
    # Exactly alphabet + specials is enough (no merges, one token per character).
    tok = build_tokenizer({"kind": "bpe", "vocab_size": alphabet + 6}, [shakespeare])
    assert tok.vocab_size == alphabet + 6
    assert tok.decode(tok.encode(shakespeare[:500])) == shakespeare[:500]
