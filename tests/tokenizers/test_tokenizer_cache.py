"""build_tokenizer: training text handling, the on-disk cache, and concurrent builders."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from lmlab.errors import DataError
from lmlab.tokenizers import BPETokenizer, CharTokenizer, build_tokenizer, text_fingerprint

BPE = {"kind": "bpe", "vocab_size": 400}


def entries(cache_dir: Path) -> list[str]:
    root = cache_dir / "tokenizers"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_second_build_loads_from_cache_without_training(tmp_path, shakespeare, monkeypatch):
    first = build_tokenizer(BPE, [shakespeare], cache_dir=tmp_path)
    assert first.from_cache is False
    assert len(entries(tmp_path)) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(BPETokenizer, "train", classmethod(no_training))
    second = build_tokenizer(BPE, [shakespeare], cache_dir=tmp_path)
    assert second.from_cache is True
    assert second.vocab == first.vocab
    assert second.encode(shakespeare[:2000]) == first.encode(shakespeare[:2000])
    assert len(entries(tmp_path)) == 1


def test_different_config_or_text_gets_its_own_entry(tmp_path, shakespeare):
    build_tokenizer(BPE, [shakespeare], cache_dir=tmp_path)
    assert not build_tokenizer(
        {**BPE, "vocab_size": 401}, [shakespeare], cache_dir=tmp_path
    ).from_cache
    assert not build_tokenizer(
        {**BPE, "lowercase": True}, [shakespeare], cache_dir=tmp_path
    ).from_cache
    assert not build_tokenizer(BPE, [shakespeare[:-1]], cache_dir=tmp_path).from_cache
    assert not build_tokenizer({"kind": "char"}, [shakespeare], cache_dir=tmp_path).from_cache
    assert len(entries(tmp_path)) == 5
    assert build_tokenizer({**BPE, "lowercase": True}, [shakespeare], cache_dir=tmp_path).from_cache


def test_text_fingerprint_follows_content_and_split():
    assert text_fingerprint(["ab", "c"]) == text_fingerprint(["ab", "c"])
    assert text_fingerprint(["ab", "c"]) == text_fingerprint(lambda: iter(["ab", "c"]))
    assert text_fingerprint("abc") == text_fingerprint(["abc"])  # a bare string is one text
    assert text_fingerprint(["ab", "c"]) != text_fingerprint(["a", "bc"])
    assert text_fingerprint(["ab", "c"]) != text_fingerprint(["ab", "d"])
    assert len(text_fingerprint([])) == 64


def test_a_callable_source_is_streamed_once_per_pass(tmp_path, shakespeare):
    calls = []

    def lines():
        calls.append(1)
        return iter(shakespeare.splitlines(keepends=True))

    tok = build_tokenizer(BPE, lines, cache_dir=tmp_path)
    assert len(calls) == 2  # fingerprint, then training
    assert tok.decode(tok.encode(shakespeare[:3000])) == shakespeare[:3000]
    assert build_tokenizer(BPE, lines, cache_dir=tmp_path).from_cache


def test_byte_needs_no_text(tmp_path):
    tok = build_tokenizer({"kind": "byte"}, cache_dir=tmp_path)
    assert tok.vocab_size == 262
    assert entries(tmp_path) == []


@pytest.mark.parametrize("texts", [None, [], [""], ["", ""], lambda: iter([])])
@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_no_training_text_is_a_data_error(kind, texts, tmp_path):
    with pytest.raises(DataError, match="no training text for the tokenizer"):
        build_tokenizer({"kind": kind}, texts, cache_dir=tmp_path)
    assert entries(tmp_path) == []


def test_non_string_text_is_a_data_error():
    with pytest.raises(DataError, match="item 1 is a bytes"):
        build_tokenizer({"kind": "char"}, ["ok", b"raw bytes"])


def test_an_unreadable_cache_entry_is_retrained(tmp_path, shakespeare):
    build_tokenizer({"kind": "char"}, [shakespeare], cache_dir=tmp_path)
    (entry,) = entries(tmp_path)
    (tmp_path / "tokenizers" / entry / "lmlab_tokenizer.json").write_text("{", encoding="utf-8")
    again = build_tokenizer({"kind": "char"}, [shakespeare], cache_dir=tmp_path)
    assert again.from_cache is False
    assert build_tokenizer({"kind": "char"}, [shakespeare], cache_dir=tmp_path).from_cache


def _build_in_subprocess(cache_dir: str, text: str, barrier) -> tuple[bool, list[int], list[str]]:
    barrier.wait()  # start both builds at the same moment
    tok = build_tokenizer(BPE, [text], cache_dir=cache_dir)
    return tok.from_cache, tok.encode(text[:5000]), tok.vocab


def test_concurrent_builders_train_once_and_agree(tmp_path, shakespeare):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        jobs = [
            pool.apply_async(_build_in_subprocess, (str(tmp_path), shakespeare, barrier))
            for _ in range(2)
        ]
        results = [job.get(timeout=60) for job in jobs]
    assert sorted(from_cache for from_cache, _, _ in results) == [False, True]
    (_, ids_a, vocab_a), (_, ids_b, vocab_b) = results
    assert ids_a == ids_b and vocab_a == vocab_b
    assert len(entries(tmp_path)) == 1
    leftovers = [p.name for p in (tmp_path / "tokenizers").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    local = build_tokenizer(BPE, [shakespeare], cache_dir=tmp_path)
    assert local.from_cache and local.encode(shakespeare[:5000]) == ids_a


def test_char_training_is_deterministic(shakespeare):
    a = build_tokenizer({"kind": "char"}, [shakespeare])
    b = CharTokenizer.train(a.config, lambda: reversed(shakespeare.splitlines(keepends=True)))
    assert a.vocab == b.vocab
