"""The text corpus module: one tokenization into a shared memmap, windows, errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from lmlab import ConfigError, DataError
from lmlab.data import TextCorpusDataModule
from lmlab.data.reading import read_corpus
from tests.conftest import SHAKESPEARE


def _dm(path, cache_dir, **kw):
    args = dict(path=path, seq_len=16, batch_size=4, tokenizer={"kind": "char"}, cache_dir=cache_dir)
    args.update(kw)
    return TextCorpusDataModule(**args)


def test_tokens_are_cached_as_a_memmap_and_reused(tmp_path):
    text = SHAKESPEARE.read_text()[:20000]
    (tmp_path / "a.txt").write_text(text)
    first = _dm(tmp_path / "a.txt", tmp_path / "cache")
    first.setup()
    assert isinstance(first.tokens["train"], np.memmap)
    assert first.tokenizer.decode(first.tokens["train"][:200].tolist()) == text[:200]
    files = sorted((tmp_path / "cache" / "tokens").glob("*.bin"))
    assert len(files) == 3
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = _dm(tmp_path / "a.txt", tmp_path / "cache")
    second.setup()
    assert second.tokenizer.from_cache
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert np.array_equal(second.tokens["val"], first.tokens["val"])


def test_windows_are_shifted_pairs(tmp_path):
    (tmp_path / "a.txt").write_text(SHAKESPEARE.read_text()[:20000])
    dm = _dm(tmp_path / "a.txt", None)
    dm.setup()
    batch = dm.collate_train([dm.train_item(0), dm.train_item(5)])
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == 16


def test_folders_and_gzip_are_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("first file\n")
    assert read_corpus(tmp_path) == "first file\n\nsecond file\n"


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        _dm("", None)
    (tmp_path / "short.txt").write_text("too short to make a window\n")
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        _dm(tmp_path / "short.txt", None, seq_len=64).setup()
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        read_corpus(tmp_path / "bad.gz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        read_corpus(tmp_path / "empty_dir")


def test_extra_eval_lengths_serve_extra_dataloaders(tmp_path):
    (tmp_path / "a.txt").write_text(SHAKESPEARE.read_text()[:40000])
    dm = _dm(tmp_path / "a.txt", None, eval_seq_lens=[32, 64], max_eval_windows=4)
    dm.setup()
    assert dm.max_sequence_length == 64
    loaders = dm.val_dataloader()
    assert [next(iter(loader))["input_ids"].shape[1] for loader in loaders] == [16, 32, 64]
    assert len(dm.test_dataloader()) == 3
    with pytest.raises(ConfigError, match="data.eval_seq_lens"):
        _dm(tmp_path / "a.txt", None, eval_seq_lens=[16])
    with pytest.raises(ConfigError, match="data.eval_seq_lens"):
        _dm(tmp_path / "a.txt", None, eval_seq_lens=[0])
    with pytest.raises(DataError, match="eval_seq_lens"):
        _dm(tmp_path / "a.txt", None, eval_seq_lens=[100000]).setup()
