"""The kinds added by the tokenizer lab: lossless round trips, digits, wordpiece, hf, specials."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.tokenizers import build_tokenizer, load_tokenizer
from tests.tokenizers.conftest import FLORES_DEV, HF_FIXTURE

ALL_FLORES = sorted(p.name.split(".")[0] for p in FLORES_DEV.glob("*.dev"))
AWKWARD = [" leading", "trailing ", "two  spaces\tand tab", "a\n\nb\n", "\r\n", "🙂 é", "<eos>"]


@pytest.fixture(scope="module")
def flores_all() -> dict[str, str]:
    """Every FLORES language (18): its first 60 dev sentences as one text."""
    assert len(ALL_FLORES) == 18
    return {
        lang: "\n".join((FLORES_DEV / f"{lang}.dev").read_text(encoding="utf-8").splitlines()[:60])
        for lang in ALL_FLORES
    }


LOSSLESS = {
    "byte": {"kind": "byte"},
    "bytelevel_bpe": {"kind": "bytelevel_bpe", "vocab_size": 600},
    "sentencepiece": {"kind": "sentencepiece", "vocab_size": 600, "normalization": "none"},
}


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_kinds_round_trip_every_flores_language(name, flores_all, shakespeare):
    # Trained on English only, so the other 17 scripts are unseen: lossless means bytes, not <unk>.
    tok = build_tokenizer(LOSSLESS[name], [shakespeare[:50_000]])
    for lang, text in flores_all.items():
        ids = tok.encode(text)
        assert tok.unk_id not in ids, lang
        assert tok.decode(ids) == text, lang
        assert np.array_equal(tok.encode_to_array(text), ids), lang
    for text in AWKWARD:
        assert tok.decode(tok.encode(text)) == text, repr(text)


DIGIT_KINDS = ["word", "bpe", "bytelevel_bpe", "wordpiece", "unigram"]
NUMBERS = "1234567 12 123 1234 year 2024, pi 3.14159"


def pieces(tok, text: str) -> list[str]:
    """The digit strings of each token, in order (byte-level spaces and markers removed)."""
    tokens = [tok.id_to_token(i) for i in tok.encode(text)]
    digits = ["".join(c for c in t if c.isdigit()) for t in tokens]
    return [d for d in digits if d]


def boundaries(parts: list[str]) -> set[int]:
    return set(np.cumsum([len(p) for p in parts]).tolist())


@pytest.mark.parametrize("kind", DIGIT_KINDS)
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("split", ["1", "2", "3", "4", "5", "6", "7"]),
        ("group_l2r", ["123", "456", "7"]),
        ("group_r2l", ["1", "234", "567"]),
    ],
)
def test_digit_rules(kind, mode, expected):
    train = [NUMBERS * 50, "1234567 " * 100]
    tok = build_tokenizer({"kind": kind, "vocab_size": 300, "digits": mode}, train)
    # The pre-tokenizer isolates exactly the groups ...
    pre = tok.library.pre_tokenizer.pre_tokenize_str("1234567")
    assert [p for p, _ in pre if p.strip("▁Ġ")] == expected
    # ... so no token crosses a group boundary (a model may still split inside a group).
    got = pieces(tok, "1234567")
    assert "".join(got) == "1234567" and boundaries(expected) <= boundaries(got)
    if kind in ("word", "bpe", "bytelevel_bpe"):  # frequent groups are learned whole
        assert got == expected
    if kind not in ("word", "wordpiece"):  # those decode words joined by spaces
        assert tok.decode(tok.encode(NUMBERS)) == NUMBERS


def test_sentencepiece_splits_digits():
    tok = build_tokenizer(
        {"kind": "sentencepiece", "vocab_size": 300, "digits": "split"}, [NUMBERS * 50]
    )
    assert pieces(tok, "1234567") == list("1234567")


def test_wordpiece_uses_continuation_pieces(shakespeare):
    tok = build_tokenizer({"kind": "wordpiece", "vocab_size": 400}, [shakespeare])
    tokens = [tok.id_to_token(i) for i in tok.encode("Citizens proceeding")]
    assert len(tokens) > 2 and any(t.startswith("##") for t in tokens)
    assert tok.decode(tok.encode("Before we proceed, hear me.")) == "Before we proceed, hear me."
    lower = build_tokenizer(
        {"kind": "wordpiece", "vocab_size": 400, "lowercase": True}, [shakespeare]
    )
    assert lower.decode(lower.encode("FIRST Citizen")) == "first citizen"


def test_unigram_round_trips_like_bpe(shakespeare):
    tok = build_tokenizer({"kind": "unigram", "vocab_size": 800}, [shakespeare])
    assert tok.vocab_size <= 800
    text = shakespeare[:20_000]
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 2


def test_hf_file_is_shifted_past_lmlab_specials(tmp_path):
    tok = build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE)})
    library = tok.library
    assert tok.id_offset == 6 and tok.vocab_size == library.get_vocab_size() + 6
    text = "First Citizen:\nBefore we proceed <|endoftext|> 🙂"
    raw = library.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == [i + 6 for i in raw]  # its own special is text, like ours
    assert tok.decode(tok.encode(text)) == text  # byte-level: lossless
    assert tok.id_to_token(library.token_to_id("<|endoftext|>") + 6) == "<|endoftext|>"
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special_tokens=False) == "<bos>hi"
    # A folder holding tokenizer.json works too, and the run's saved copy needs no path.
    same = build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE.parent)})
    assert same.encode(text) == tok.encode(text)
    assert load_tokenizer(tok.save(tmp_path / "t")).encode(text) == tok.encode(text)


def test_hf_file_with_lmlab_specials_keeps_its_ids(tmp_path, shakespeare):
    trained = build_tokenizer({"kind": "bpe", "vocab_size": 300}, [shakespeare])
    path = tmp_path / "tokenizer.json"
    path.write_text(trained.library.to_str(), encoding="utf-8")
    tok = build_tokenizer({"kind": "hf", "path": str(path)})
    assert tok.id_offset == 0
    assert tok.encode(shakespeare[:500]) == trained.encode(shakespeare[:500])


def test_given_sentencepiece_model_is_used_as_is(tmp_path, shakespeare):
    trained = build_tokenizer({"kind": "sentencepiece", "vocab_size": 400}, [shakespeare])
    path = tmp_path / "m.model"
    path.write_bytes(trained.model_bytes)
    given = build_tokenizer({"kind": "sentencepiece", "path": str(path)})
    assert given.id_offset == 0 and given.vocab == trained.vocab
    assert given.encode(shakespeare[:800]) == trained.encode(shakespeare[:800])


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe", "unigram", "sentencepiece"])
def test_extra_special_tokens_follow_the_fixed_six(kind, shakespeare, tmp_path):
    config = {"kind": kind, "vocab_size": 400, "special_tokens": ["<user>", "<bot>"]}
    tok = build_tokenizer(config, [shakespeare[:30_000]])
    assert tok.vocab[:8] == [
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
        "<mask>",
        "<sep>",
        "<user>",
        "<bot>",
    ]
    assert tok.token_to_id("<bot>") == 7 and tok.special_ids == frozenset(range(8))
    ids = tok.encode("a <user> b")
    assert 6 not in ids and 7 not in ids  # text never becomes a special
    wrapped = [6, *tok.encode("First"), 7]
    shown = tok.decode(wrapped, skip_special_tokens=False)
    assert shown.startswith("<user>") and shown.endswith("<bot>")
    assert shown.removeprefix("<user>").removesuffix("<bot>").strip() == "First"
    assert tok.decode(wrapped) == tok.decode(tok.encode("First")) == "First"
    assert load_tokenizer(tok.save(tmp_path / "t")).vocab == tok.vocab


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_numpy_kinds_normalise_on_request(kind, shakespeare):
    tok = build_tokenizer(
        {"kind": kind, "lowercase": True, "normalization": "nfkc"}, [shakespeare.lower() + "fi"]
    )
    assert tok.decode(tok.encode("Ｆirst ﬁ")) == "first fi"
