"""Stochastic tokenization reaches training batches only, reproducibly from (seed, step)."""

from __future__ import annotations

import pytest

from lmlab import ConfigError
from lmlab.data import SyntheticTasksDataModule, TextCorpusDataModule
from tests.conftest import SHAKESPEARE


def _synthetic(cache_dir, **tok):
    dm = SyntheticTasksDataModule(tasks=["sort_asc"], n_train=64, n_val=8, n_test=8, batch_size=8,
                                  tokenizer={"kind": "bpe", "vocab_size": 200, **tok}, cache_dir=cache_dir)
    dm.setup()
    return dm


def test_stochastok_changes_training_items_only(cache_dir):
    dm = _synthetic(cache_dir, stochastok=0.5)
    assert dm.stochastic_training
    plain = [dm.train_item(i) for i in range(16)]
    sampled = [dm.train_item(i, step=7) for i in range(16)]
    assert sampled != plain
    assert sampled == [dm.train_item(i, step=7) for i in range(16)]  # same (seed, step) → same ids
    for (p0, t0), (p1, t1) in zip(plain, sampled):
        assert dm.tokenizer.decode(p1) == dm.tokenizer.decode(p0)
        assert dm.tokenizer.decode(t1) == dm.tokenizer.decode(t0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert next(iter(dm.val_dataloader()))["input_ids"].tolist() == next(iter(dm.val_dataloader()))["input_ids"].tolist()


def test_text_windows_take_stochastok_and_refuse_dropout(tmp_path):
    (tmp_path / "a.txt").write_text(SHAKESPEARE.read_text()[:30000])
    dm = TextCorpusDataModule(path=tmp_path / "a.txt", seq_len=16, batch_size=4, cache_dir=tmp_path,
                              tokenizer={"kind": "bpe", "vocab_size": 300, "stochastok": 0.5})
    dm.setup()
    window = dm.train_item(0, step=1)
    assert len(window) == 17 and list(window) != list(dm.train_item(0))
    bad = TextCorpusDataModule(path=tmp_path / "a.txt", seq_len=16, batch_size=4, cache_dir=tmp_path,
                               tokenizer={"kind": "bpe", "vocab_size": 300, "dropout": 0.1})
    with pytest.raises(ConfigError, match="tokenizer.dropout"):
        bad.setup()
