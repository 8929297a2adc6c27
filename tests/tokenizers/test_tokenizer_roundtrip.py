"""What each kind gives back from decode(encode(text)), on real text."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from lmlab.tokenizers import build_tokenizer

# Edge cases for whitespace handling: leading/trailing/repeated spaces, blank lines, tabs, CRLF.
AWKWARD = [
    "",
    " ",
    "  ",
    "\n",
    " leading space",
    "trailing space ",
    "two  spaces and\ttab",
    "line one\n\nline three\n",
    "\n\nstarts with newlines",
    "windows\r\nline end",
    "space before newline \nand after\n ",
]


def test_byte_round_trips_many_scripts_exactly(flores):
    tok = build_tokenizer({"kind": "byte"})
    for lang, lines in flores.items():
        text = "\n".join(lines)
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8")), lang
        assert min(ids) >= 6 and max(ids) <= 261, lang
        assert tok.decode(ids) == text, lang
        assert tok.decode_batch(tok.encode_batch(lines)) == lines, lang
    for text in AWKWARD + ["emoji 🙂 and a combining é"]:
        assert tok.decode(tok.encode(text)) == text


def test_byte_decode_replaces_invalid_utf8_from_generation():
    tok = build_tokenizer({"kind": "byte"})
    first_half_of_e_acute = "é".encode()[0] + 6
    assert tok.decode([first_half_of_e_acute, ord("a") + 6]) == "\ufffda"


def test_char_round_trips_its_training_text(shakespeare, flores):
    tok = build_tokenizer({"kind": "char"}, [shakespeare])
    assert tok.vocab_size == 6 + len(set(shakespeare))
    assert tok.vocab[6:] == sorted(set(shakespeare))
    assert tok.decode(tok.encode(shakespeare)) == shakespeare
    multilingual = ["\n".join(lines) for lines in flores.values()]
    tok = build_tokenizer({"kind": "char"}, multilingual)
    assert tok.decode_batch(tok.encode_batch(multilingual)) == multilingual
    assert tok.encode_batch(multilingual[:3]) == [tok.encode(t) for t in multilingual[:3]]


def test_char_maps_unknown_characters_to_unk():
    tok = build_tokenizer({"kind": "char"}, ["abc"])
    assert tok.encode("abzc") == [6, 7, tok.unk_id, 8]
    assert tok.decode(tok.encode("abzc")) == "abc"
    assert tok.decode(tok.encode("abzc"), skip_special_tokens=False) == "ab<unk>c"


def test_word_splits_words_numbers_and_punctuation():
    tok = build_tokenizer({"kind": "word"}, ["add 2: 8 13 2 5", "hello, world... x_y 3.14"])
    ids = tok.encode("add 2: 8 13 2 5")
    assert [tok.id_to_token(i) for i in ids] == ["add", "2", ":", "8", "13", "2", "5"]
    assert tok.decode(ids) == "add 2 : 8 13 2 5"
    tokens = [tok.id_to_token(i) for i in tok.encode("hello, world... x_y 3.14")]
    assert tokens == ["hello", ",", "world", ".", ".", ".", "x_y", "3", ".", "14"]
    # Whitespace is not kept: newlines and runs of spaces decode as single spaces.
    assert tok.decode(tok.encode("add  2\n8")) == "add 2 8"


def test_word_keeps_scripts_with_combining_marks_whole():
    tok = build_tokenizer({"kind": "word"}, ["हिन्दी भाषा"])
    assert [tok.id_to_token(i) for i in tok.encode("हिन्दी भाषा")] == ["हिन्दी", "भाषा"]


def test_word_vocabulary_is_most_frequent_first_with_deterministic_ties():
    texts = ["b b b a a c c d", "e"]
    tok = build_tokenizer({"kind": "word", "vocab_size": 9}, texts)
    # b (3), then a and c tie at 2 and are ordered by spelling; d and e (1 each) miss the cut.
    assert tok.vocab[6:] == ["b", "a", "c"]
    assert tok.encode("d a") == [tok.unk_id, 7]
    assert tok.decode(tok.encode("d a")) == "a"
    assert tok.decode(tok.encode("d a"), skip_special_tokens=False) == "<unk> a"
    frequent = build_tokenizer({"kind": "word", "min_frequency": 2}, texts)
    assert frequent.vocab[6:] == ["b", "a", "c"]


def test_word_lowercase():
    tok = build_tokenizer({"kind": "word", "lowercase": True}, ["The the THE"])
    assert tok.vocab[6:] == ["the"]
    assert tok.decode(tok.encode("THE The")) == "the the"


def test_bpe_round_trips_shakespeare_exactly(shakespeare):
    # The awkward strings join the training text so that tab and CR are in the alphabet.
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 1000}, [shakespeare, *AWKWARD])
    assert tok.vocab_size == 1000
    ids = tok.encode(shakespeare)
    assert len(ids) < len(shakespeare) / 2.5  # it learned real subwords
    assert tok.decode(ids) == shakespeare
    lines = shakespeare.splitlines(keepends=True)[:500]
    batch = tok.encode_batch(lines)
    assert batch == [tok.encode(line) for line in lines]
    assert tok.decode_batch(batch) == lines
    for text in AWKWARD:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_bpe_round_trips_multilingual_text_up_to_nfkc(flores):
    texts = ["\n".join(lines) for lines in flores.values()]
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 4000}, texts)
    for text in texts:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFKC", text)


def test_bpe_documented_normalisations(shakespeare):
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 300}, [shakespeare + "▁"])
    assert tok.decode(tok.encode("ﬁne ＡＢ")) == "fine AB"  # NFKC
    assert tok.decode(tok.encode("a▁b")) == "a b"  # the space mark is a space
    # Characters outside the training alphabet become <unk>, dropped by default.
    ids = tok.encode("a€b")
    assert tok.unk_id in ids
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<unk>b"
    lower = build_tokenizer({"kind": "bpe", "vocab_size": 300, "lowercase": True}, [shakespeare])
    assert lower.decode(lower.encode("First Citizen:\nBefore")) == "first citizen:\nbefore"


def test_bpe_encode_batch_goes_through_the_library(shakespeare, monkeypatch):
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 300}, [shakespeare])
    expected = [e.ids for e in tok.library.encode_batch(["a b", "c"], add_special_tokens=False)]
    monkeypatch.setattr(
        tok, "encode", lambda text: pytest.fail("encode_batch must not loop over encode")
    )
    assert tok.encode_batch(["a b", "c"]) == expected


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_decode_accepts_arrays_and_tensors(kind, shakespeare):
    torch = pytest.importorskip("torch")
    tok = build_tokenizer({"kind": kind, "vocab_size": 300}, [shakespeare])
    ids = tok.encode("First Citizen")
    expected = tok.decode(ids)
    assert tok.decode(np.array(ids)) == expected
    assert tok.decode(torch.tensor(ids)) == expected
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode(np.array([ids, ids]))
