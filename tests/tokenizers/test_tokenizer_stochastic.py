"""BPE-dropout, Unigram sampling and StochasTok: sampled only in training mode, decoded exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lmlab.errors import ConfigError
from lmlab.tokenizers import build_tokenizer
from lmlab.tokenizers.stochastok import apply_splits, build_split_table
from tests.tokenizers.conftest import HF_FIXTURE

LINES = [
    "First Citizen: before we proceed any further, hear me speak.",
    "You are all resolved rather to die than to famish?",
    "Let us kill him, and we'll have corn at our own price.",
]

SAMPLERS = {
    "bpe dropout": {"kind": "bpe", "dropout": 0.3},
    "bytelevel_bpe dropout": {"kind": "bytelevel_bpe", "dropout": 0.3},
    "unigram alpha": {"kind": "unigram", "alpha": 0.1},
    "sentencepiece bpe dropout": {"kind": "sentencepiece", "model_type": "bpe", "dropout": 0.3},
    "sentencepiece unigram alpha": {"kind": "sentencepiece", "alpha": 0.1},
    "bpe stochastok": {"kind": "bpe", "stochastok": 0.3},
    "wordpiece stochastok": {"kind": "wordpiece", "stochastok": 0.3},
    "unigram stochastok": {"kind": "unigram", "stochastok": 0.3},
    "sentencepiece stochastok": {"kind": "sentencepiece", "stochastok": 0.3},
    "bytelevel_bpe dropout + stochastok": {
        "kind": "bytelevel_bpe",
        "dropout": 0.1,
        "stochastok": 0.2,
    },
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_changes_training_ids_only_and_decodes_exactly(name, shakespeare):
    config = {**SAMPLERS[name], "vocab_size": 600}
    tok = build_tokenizer(config, [shakespeare[:100_000]])
    assert tok.is_stochastic
    plain = tok.encode_batch(LINES)
    # Evaluation (and the token cache) stays deterministic.
    assert tok.encode_batch(LINES) == plain
    assert tok.encode(LINES[0]) == plain[0]
    assert np.array_equal(tok.encode_to_array(LINES[0]), plain[0])
    rng = np.random.default_rng(0)
    samples = [tok.encode_batch(LINES, training=True, rng=rng) for _ in range(8)]
    assert any(s != plain for s in samples), "training mode never changed a segmentation"
    expected = tok.decode_batch(plain)
    for sample in samples:
        assert tok.decode_batch(sample) == expected
        assert all(tok.unk_id not in ids for ids in sample)
    # Sampling survives pickling (DataLoader workers get the tokenizer that way).
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode_batch(LINES) == plain
    assert any(copy.encode_batch(LINES, training=True) != plain for _ in range(8))


def test_without_sampling_options_training_mode_is_deterministic(shakespeare):
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 400}, [shakespeare[:50_000]])
    assert not tok.is_stochastic
    assert tok.encode_batch(LINES, training=True) == tok.encode_batch(LINES)


def test_stochastok_is_reproducible_with_a_seeded_generator(shakespeare):
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 600, "stochastok": 0.5}, [shakespeare])
    ids = tok.encode_to_array(shakespeare[:5000])
    a = tok.stochastok(ids, np.random.default_rng(7))
    b = tok.stochastok(ids, np.random.default_rng(7))
    assert np.array_equal(a, b) and len(a) > len(ids)
    assert tok.decode(a) == tok.decode(ids)
    # About `rate` of the splittable tokens are split (each at most once).
    assert 0.3 * len(ids) < len(a) - len(ids) < 0.6 * len(ids)


def test_split_table_on_a_hand_made_vocabulary():
    vocab = ["<pad>", "a", "b", "ab", "abc", "c", "bc", "##c", "x"]
    usable = np.array([False, *[True] * 8])
    table = build_split_table(vocab, usable)
    splits = lambda t: {  # noqa: E731
        (vocab[table.left[j]], vocab[table.right[j]])
        for j in range(table.start[t], table.start[t] + table.count[t])
    }
    assert splits(3) == {("a", "b")}
    assert splits(4) == {("a", "bc"), ("ab", "c")}
    assert splits(1) == set() and splits(0) == set()
    wordpiece = build_split_table(
        ["[x]", "ab", "a", "##b", "##ab", "##a"], np.array([False, *[True] * 5]), "##"
    )
    assert wordpiece.count.tolist() == [0, 1, 0, 0, 1, 0]  # ab = a + ##b, ##ab = ##a + ##b
    out = apply_splits(np.array([4, 1, 4]), table, 1.0, np.random.default_rng(0))
    assert len(out) == 5 and out[2] == 1  # both "abc" split, "a" cannot be


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"kind": "char", "dropout": 0.1}, "tokenizer.dropout"),
        ({"kind": "wordpiece", "dropout": 0.1}, "tokenizer.dropout"),
        ({"kind": "bpe", "alpha": 0.1}, "tokenizer.alpha"),
        ({"kind": "word", "stochastok": 0.1}, "tokenizer.stochastok"),
        ({"kind": "byte", "stochastok": 0.1}, "tokenizer.stochastok"),
        ({"kind": "bpe", "dropout": 1.0}, "tokenizer.dropout"),
        ({"kind": "unigram", "alpha": 0.0}, "tokenizer.alpha"),
        ({"kind": "sentencepiece", "dropout": 0.1}, "tokenizer.dropout"),
        ({"kind": "sentencepiece", "model_type": "bpe", "alpha": 0.1}, "tokenizer.alpha"),
    ],
)
def test_sampling_options_a_kind_cannot_use_are_config_errors(config, field):
    with pytest.raises(ConfigError) as err:
        build_tokenizer(config, ["some text"])
    assert err.value.field == field


def test_hf_file_samples_according_to_its_model():
    tok = build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE), "dropout": 0.5})
    text = "First Citizen: before we proceed"
    sampled = [tok.encode(text, training=True) for _ in range(5)]
    assert any(s != tok.encode(text) for s in sampled)
    assert all(tok.decode(s) == text for s in sampled)
    with pytest.raises(ConfigError, match="alpha"):
        build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE), "alpha": 0.5})
