"""Parallel text: line-aligned (gzip) files, shared vocabulary, seq2seq batches, errors."""

from __future__ import annotations

import gzip

import pytest

from lmlab import ConfigError, DataError
from lmlab.data import ParallelTextDataModule
from lmlab.data.collate import IGNORE_INDEX
from lmlab.data.parallel import read_parallel
from tests.conftest import SHARED_DATA

MULTI30K = SHARED_DATA / "multi30k_de_en"


def test_multi30k_val_is_read_line_aligned():
    pairs, dropped = read_parallel(MULTI30K / "val.de.gz", MULTI30K / "val.en.gz")
    assert len(pairs) == 1014 and dropped == 0
    with gzip.open(MULTI30K / "val.en.gz", "rt", encoding="utf-8") as f:
        english = f.read().splitlines()
    assert [p.target for p in pairs] == [line.strip() for line in english]


def test_seq2seq_batches_from_multi30k_val(cache_dir):
    # val as training data and test_2016 as test keeps the test fast; validation is carved off
    dm = ParallelTextDataModule(
        MULTI30K / "val.de.gz", MULTI30K / "val.en.gz",
        test_src_path=MULTI30K / "test_2016_flickr.de.gz", test_tgt_path=MULTI30K / "test_2016_flickr.en.gz",
        tokenizer={"kind": "word", "vocab_size": 3000}, cache_dir=cache_dir, max_length=12, batch_size=4,
    )
    dm.setup()
    assert dm.kind == "seq2seq"
    assert {s: len(e) for s, e in dm.encoded.items()} == {"train": 963, "val": 51, "test": 1000}
    assert dm.truncated["test"] > 0 and dm.max_sequence_length <= 12
    tok = dm.tokenizer
    # one vocabulary for both languages
    assert tok.token_to_id("Mann") is not None and tok.token_to_id("man") is not None
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask", "target_text", "eval_index"}
    assert (batch["tgt_in"][:, 0] == tok.bos_id).all()
    for b in range(batch["src_ids"].shape[0]):
        n_src = int(batch["src_mask"][b].sum())
        assert batch["src_ids"][b, n_src - 1] == tok.eos_id
        out = batch["tgt_out"][b]
        real = out[out != IGNORE_INDEX]
        assert len(real) == int(batch["tgt_mask"][b].sum())
        assert (batch["tgt_in"][b, 1 : len(real)] == real[:-1]).all()
    assert dm.task_kwargs()["max_new_tokens"] == 12  # the cut target plus <eos>


def test_mismatched_files_name_both_and_their_counts(tmp_path):
    (tmp_path / "a.de").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "a.en").write_text("one\ntwo")
    with pytest.raises(DataError, match="3 lines") as info:
        read_parallel(tmp_path / "a.de", tmp_path / "a.en")
    assert "a.en" in str(info.value) and "has 2" in str(info.value)


def test_pairs_with_an_empty_side_are_dropped(tmp_path):
    (tmp_path / "a.de").write_text("eins\n\ndrei\r\nvier\n")
    (tmp_path / "a.en").write_text("one\ntwo\nthree\r\n  \n")
    pairs, dropped = read_parallel(tmp_path / "a.de", tmp_path / "a.en")
    assert [(p.source, p.target) for p in pairs] == [("eins", "one"), ("drei", "three")] and dropped == 2


def test_config_errors():
    with pytest.raises(ConfigError, match="data.train_src_path"):
        ParallelTextDataModule()
    with pytest.raises(ConfigError, match="data.val_tgt_path"):
        ParallelTextDataModule("a", "b", val_src_path="c")
    with pytest.raises(ConfigError, match="data.max_length"):
        ParallelTextDataModule("a", "b", max_length=1)
