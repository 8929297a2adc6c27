"""`data=text`: a local text file or folder as a causal-LM corpus."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lmlab.data.base import LMDataModule
from lmlab.data.reading import read_corpus
from lmlab.data.token_cache import cached_tokens
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import build_tokenizer


class TextCorpusDataModule(LMDataModule):
    """Random `seq_len` windows of a tokenized corpus for training; its tail for validation/test.

    The corpus is tokenized once into a memory-mapped file keyed by the tokenizer and the text,
    so runs and sweep jobs on the same corpus share it. Training draws windows at offsets that
    depend only on (seed, step); evaluation uses consecutive non-overlapping windows.
    """

    kind = "text"
    sampling = "random"

    def __init__(
        self,
        path: str | Path = "",
        seq_len: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_eval_windows: int = 64,
        tokenizer_train_chars: int = 2_000_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not path:
            raise ConfigError("data.path", path, reason="data=text needs a file or folder of text (.txt/.gz)")
        if seq_len < 1:
            raise ConfigError("data.seq_len", seq_len, reason="must be a positive integer")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 0.5:
                raise ConfigError(f"data.{name}", value, reason="must be in (0, 0.5)")
        self.path = Path(path)
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_eval_windows = max_eval_windows
        self.tokenizer_train_chars = tokenizer_train_chars

    def _prepare(self) -> None:
        text = read_corpus(self.path)
        n = len(text)
        val_start = int(n * (1 - self.val_fraction - self.test_fraction))
        test_start = int(n * (1 - self.test_fraction))
        parts = {"train": text[:val_start], "val": text[val_start:test_start], "test": text[test_start:]}
        if self.tokenizer is None:
            sample = parts["train"][: self.tokenizer_train_chars]
            self.tokenizer = build_tokenizer(self.tokenizer_config, [sample], cache_dir=self.cache_dir)
        text_hash = hashlib.sha256(text.encode()).hexdigest()
        fractions = f"{self.val_fraction}:{self.test_fraction}"
        self.tokens = {
            split: cached_tokens(self.tokenizer, part, f"{text_hash}:{fractions}:{split}", self.cache_dir)
            for split, part in parts.items()
        }
        for split, toks in self.tokens.items():
            if len(toks) < self.seq_len + 1:
                raise DataError(
                    self.path,
                    f"the {split} split has {len(toks)} tokens, fewer than data.seq_len+1={self.seq_len + 1}; "
                    "use more text, a smaller data.seq_len or larger data.*_fraction",
                )

    @property
    def max_sequence_length(self) -> int:
        return self.seq_len

    @property
    def num_train_items(self) -> int:
        return len(self.tokens["train"]) - self.seq_len

    def train_item(self, index: int) -> np.ndarray:
        return self.tokens["train"][index : index + self.seq_len + 1]

    def collate_train(self, items: list[np.ndarray]) -> dict:
        windows = torch.from_numpy(np.stack(items).astype(np.int64))
        return {
            "input_ids": windows[:, :-1],
            "labels": windows[:, 1:],
            "attention_mask": torch.ones_like(windows[:, :-1]),
        }

    def _eval_loader(self, split: str) -> DataLoader:
        toks = self.tokens[split]
        n_windows = min((len(toks) - 1) // self.seq_len, self.max_eval_windows)
        items = [toks[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in range(n_windows)]
        return DataLoader(items, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate_train)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
