"""encode_to_array: a large text cut into pieces for parallel encoding gives exactly encode(text)."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.tokenizers import TOKENIZER_KINDS, build_tokenizer, chunking
from lmlab.tokenizers.base import UNK_ID
from lmlab.tokenizers.chunking import (
    Continuation,
    continued_pieces,
    find_continuation,
    split_text,
)
from lmlab.tokenizers.pipeline import PipelineTokenizer
from lmlab.tokenizers.sentencepiece import SentencePieceTokenizer
from tests.tokenizers.conftest import HF_FIXTURE


def test_split_text_cuts_only_after_a_newline_between_non_spaces():
    text = "aaa\nbbb \nccc\n\nddd\n eee\nfff"
    pieces = split_text(text, size=2)
    assert "".join(pieces) == text
    assert pieces == ["aaa\n", "bbb \nccc\n\nddd\n eee\n", "fff"]
    assert split_text("no newline at all " * 10, size=5) == ["no newline at all " * 10]
    assert split_text("", size=5) == [""]


@pytest.fixture(scope="module")
def mixed_text(shakespeare, flores) -> str:
    """Shakespeare and ten scripts, with blank lines, leading spaces and CRLF line ends."""
    multilingual = "\n".join(lines[0] for lines in flores.values())
    return shakespeare[:15_000] + "\n" + multilingual + "\n  indented\r\nwindows line\n\nend"


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_encode_to_array_equals_encoding_the_whole_text(kind, mixed_text, monkeypatch):
    if kind == "hf":
        tok = build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE)})
    else:
        tok = build_tokenizer({"kind": kind, "vocab_size": 1600}, [mixed_text])
    monkeypatch.setattr(chunking, "CHUNK_CHARS", 300)  # many pieces, many cuts
    monkeypatch.setattr(chunking, "BATCH_PIECES", 7)  # several library calls, uneven last one
    assert len(split_text(mixed_text)) > 40
    whole = tok.encode(mixed_text)
    arr = tok.encode_to_array(mixed_text, np.uint16)
    assert arr.dtype == np.uint16
    assert arr.tolist() == whole
    assert tok.encode_to_array("").size == 0


def _library_ids(tok, text: str) -> np.ndarray:
    """The ids of the whole text from the library lmlab wraps, called directly (for byte and
    char, whose "library" is a codec: the UTF-8 bytes, the alphabet looked up per character)."""
    if isinstance(tok, PipelineTokenizer):
        ids = tok.library.encode(text, add_special_tokens=False).ids
    elif isinstance(tok, SentencePieceTokenizer):
        ids = tok.processor.encode(text)
    elif tok.kind == "byte":
        return np.frombuffer(text.encode("utf-8"), np.uint8) + tok.num_special_tokens
    else:
        known = {token: i for i, token in enumerate(tok.vocab)}
        return np.array([known.get(c, UNK_ID) for c in text])
    return np.array(ids, dtype=np.int64) + tok.id_offset


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_encode_to_array_equals_the_library_called_directly(kind, mixed_text, monkeypatch):
    """What the token cache stores is the library's own output for the whole text: the
    pipeline's cutting, prefixing, batching and id conversion change nothing."""
    if kind == "hf":
        tok = build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE)})
    else:
        tok = build_tokenizer({"kind": kind, "vocab_size": 1600}, [mixed_text[:8000]])
    monkeypatch.setattr(chunking, "CHUNK_CHARS", 200)
    monkeypatch.setattr(chunking, "BATCH_PIECES", 5)
    assert len(split_text(mixed_text)) > 60
    direct = _library_ids(tok, mixed_text)
    for dtype in (np.uint16, np.uint32, np.int64):
        arr = tok.encode_to_array(mixed_text, dtype)
        assert arr.dtype == dtype
        np.testing.assert_array_equal(arr, direct)


def test_continued_pieces_slice_the_prefix_from_the_text():
    text = "one\ntwo\nthree\nfour"
    assert continued_pieces(text, None, size=2) == [text]
    assert continued_pieces(text, Continuation(), size=2) == split_text(text, size=2)
    after_newline = continued_pieces(text, Continuation("\n", 2), size=2)
    assert after_newline == ["one\n", "\ntwo\n", "\nthree\n", "\nfour"]
    # A prefix the text does not hold before the cut is prepended.
    assert continued_pieces(text, Continuation("#", 1), size=2)[1:] == ["#two\n", "#three\n", "#four"]
    assert continued_pieces("", Continuation("\n", 2)) == [""]


def test_prefix_marking_pipelines_get_a_continuation(shakespeare):
    bpe = build_tokenizer({"kind": "bpe", "vocab_size": 300}, [shakespeare])
    gpt2 = build_tokenizer({"kind": "bytelevel_bpe", "vocab_size": 300}, [shakespeare])
    bpe.encode_to_array("x")
    gpt2.encode_to_array("x")
    # bpe prepends "▁" to every text; a piece is encoded after "\n" whose two ids are dropped.
    assert bpe._continuation == Continuation("\n", 2)
    assert gpt2._continuation == Continuation("", 0)


def test_a_pipeline_that_cannot_be_cut_is_encoded_whole():
    # A toy encoder that counts the characters before each one: no prefix makes cuts exact.
    def positional(text: str) -> list[int]:
        return list(range(len(text)))

    assert find_continuation(positional) is None
