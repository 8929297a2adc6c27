"""The Tokenizer contract, checked for every kind: specials, ids, save/load."""

from __future__ import annotations

import json
import pickle

import pytest

from lmlab.errors import DataError
from lmlab.tokenizers import (
    SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)
from tests.tokenizers.conftest import HF_FIXTURE

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
LIBRARY_KINDS = ("word", "bpe", "bytelevel_bpe", "wordpiece", "unigram", "hf")
SIDE_FILES = {
    **{kind: ["tokenizer.json"] for kind in LIBRARY_KINDS},
    "sentencepiece": ["sentencepiece.model.b64"],
}


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def tok(request, shakespeare) -> Tokenizer:
    if request.param == "hf":
        return build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE)})
    # Large enough for word to know every word of SAMPLE; the others stay small and fast.
    vocab_size = 4000 if request.param == "word" else 500
    return build_tokenizer({"kind": request.param, "vocab_size": vocab_size}, [shakespeare])


def test_specials_sit_at_ids_0_to_5(tok):
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<sep>")
    ids = (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id, tok.sep_id)
    assert ids == (0, 1, 2, 3, 4, 5)
    assert tok.special_ids == frozenset(range(6))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.id_to_token(i) == token
        assert tok.token_to_id(token) == i
    assert tok.vocab[:6] == list(SPECIAL_TOKENS)


def test_vocab_size_and_lookups_agree(tok):
    assert tok.vocab_size == len(tok.vocab) == len(set(tok.vocab))
    assert tok.id_to_token(tok.vocab_size) is None
    assert tok.id_to_token(-1) is None
    assert tok.token_to_id("no such token here") is None
    for i in (6, tok.vocab_size // 2, tok.vocab_size - 1):
        assert tok.token_to_id(tok.id_to_token(i)) == i


def test_encode_adds_no_specials_and_text_never_becomes_one(tok):
    ids = tok.encode(SAMPLE)
    assert ids and min(ids) >= 6
    # The literal spelling of a special token is text; its characters are all in the corpus
    # only for byte, so elsewhere it may contain <unk> but never <eos>.
    literal = tok.encode("a <eos> b")
    assert tok.eos_id not in literal
    assert tok.encode("") == []
    assert tok.encode_batch([SAMPLE, ""]) == [ids, []]


def test_decode_skips_specials_unless_asked(tok):
    ids = tok.encode(SAMPLE)
    plain = tok.decode(ids)
    wrapped = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(wrapped) == plain
    shown = tok.decode(wrapped, skip_special_tokens=False)
    # word and wordpiece join words with spaces
    tail = "<eos> <pad> <pad>" if tok.kind in ("word", "wordpiece") else "<eos><pad><pad>"
    assert shown.startswith("<bos>") and shown.endswith(tail)
    assert tok.decode_batch([wrapped, ids]) == [plain, plain]


def test_ids_beyond_the_vocab_decode_as_unk(tok):
    # Backbones pad the vocabulary to a multiple of 64, so sampling can produce such ids.
    ids = tok.encode("First")
    beyond = [*ids, tok.vocab_size + 3]
    assert tok.decode(beyond) == tok.decode(ids)
    assert tok.decode(beyond, skip_special_tokens=False).endswith("<unk>")


def test_save_then_load_gives_identical_encodings(tok, tmp_path, shakespeare):
    directory = tok.save(tmp_path / "tok")
    assert (directory / "lmlab_tokenizer.json").is_file()
    for name in SIDE_FILES.get(tok.kind, []):
        assert (directory / name).is_file()
    loaded = load_tokenizer(directory)
    assert type(loaded) is type(tok)
    assert loaded.config == tok.config
    assert loaded.vocab == tok.vocab
    lines = shakespeare.splitlines()[:300] + ["unseen ✓ text", "a <eos> b"]
    assert loaded.encode_batch(lines) == tok.encode_batch(lines)
    assert loaded.decode(tok.encode(SAMPLE)) == tok.decode(tok.encode(SAMPLE))
    # Saving over an existing directory replaces it in place and leaves no temp files behind.
    tok.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["lmlab_tokenizer.json", *SIDE_FILES.get(tok.kind, [])]
    )
    assert load_tokenizer(directory).encode(SAMPLE) == tok.encode(SAMPLE)


def test_load_from_a_missing_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(DataError, match="lmlab_tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_rejects_corrupt_files(tok, tmp_path):
    directory = tok.save(tmp_path / "tok")
    record_path = directory / "lmlab_tokenizer.json"
    record = record_path.read_text(encoding="utf-8")

    record_path.write_text(record[: len(record) // 2], encoding="utf-8")
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(directory)

    broken = json.loads(record)
    broken["kind"] = "morfessor"
    record_path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        load_tokenizer(directory)

    broken = json.loads(record)
    broken["vocab"] = broken["vocab"][:-1]
    record_path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(DataError):
        load_tokenizer(directory)


def test_load_detects_a_side_file_from_another_save(tmp_path, shakespeare):
    small = build_tokenizer({"kind": "bpe", "vocab_size": 300}, [shakespeare])
    large = build_tokenizer({"kind": "bpe", "vocab_size": 400}, [shakespeare])
    small.save(tmp_path / "a")
    large.save(tmp_path / "b")
    (tmp_path / "a" / "tokenizer.json").write_bytes(
        (tmp_path / "b" / "tokenizer.json").read_bytes()
    )
    with pytest.raises(DataError, match="checksum"):
        load_tokenizer(tmp_path / "a")


def test_pickled_copies_encode_identically(tok):
    # DataLoader workers receive the tokenizer by pickle.
    copy = pickle.loads(pickle.dumps(tok))
    text = SAMPLE + " a <eos> b"
    assert copy.encode(text) == tok.encode(text)
    assert tok.eos_id not in copy.encode(text)
