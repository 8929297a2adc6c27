"""`data=text`: a local text file or folder as a causal-LM corpus."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lmlab.data.base import LMDataModule, capped_texts
from lmlab.data.reading import read_corpus
from lmlab.data.token_cache import cached_tokens
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import build_tokenizer


class TextCorpusDataModule(LMDataModule):
    """Random `seq_len` windows of a tokenized corpus for training; its tail for validation/test.

    The corpus is tokenized once into a memory-mapped file keyed by the tokenizer and the text,
    so runs and sweep jobs on the same corpus share it. Training draws windows at offsets that
    depend only on (seed, step); evaluation uses consecutive non-overlapping windows, of
    `seq_len` and of each of `eval_seq_lens` (extra dataloaders, e.g. 2x and 4x the training
    length for position-extrapolation studies).
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
        eval_seq_lens: Sequence[int] = (),
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
        eval_seq_lens = list(eval_seq_lens or [])
        for length in eval_seq_lens:
            if not isinstance(length, int) or length < 1:
                raise ConfigError("data.eval_seq_lens", eval_seq_lens, reason="must be a list of positive integers")
        if len(set(eval_seq_lens)) != len(eval_seq_lens) or seq_len in eval_seq_lens:
            raise ConfigError("data.eval_seq_lens", eval_seq_lens,
                              reason=f"lengths must be distinct and differ from data.seq_len={seq_len}")
        self.eval_seq_lens = eval_seq_lens

    def _prepare(self) -> None:
        text = read_corpus(self.path)
        n = len(text)
        val_start = int(n * (1 - self.val_fraction - self.test_fraction))
        test_start = int(n * (1 - self.test_fraction))
        parts = {"train": text[:val_start], "val": text[val_start:test_start], "test": text[test_start:]}
        self._val_text = parts["val"]
        if self.tokenizer is None:
            sample = parts["train"][: self.tokenizer_train_chars]
            self.tokenizer = build_tokenizer(self.tokenizer_config, [sample], cache_dir=self.cache_dir)
        config = self.tokenizer.config
        for name in ("dropout", "alpha"):
            if getattr(config, name, 0):
                raise ConfigError(
                    f"tokenizer.{name}", getattr(config, name),
                    reason="data=text trains on windows of a corpus tokenized once; sampling segmentations "
                    "needs the raw text: use tokenizer.stochastok, or data=synthetic|parallel|classification",
                )
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
            if split != "train" and self.eval_seq_lens and len(toks) < max(self.eval_seq_lens) + 1:
                raise DataError(
                    self.path,
                    f"the {split} split has {len(toks)} tokens, too few for one window of "
                    f"data.eval_seq_lens={self.eval_seq_lens}; use more text, shorter lengths or larger "
                    "data.*_fraction",
                )

    def sample_texts(self, max_chars: int = 1_000_000) -> list[str]:
        return capped_texts(self._val_text.splitlines(), max_chars)

    @property
    def max_sequence_length(self) -> int:
        return max([self.seq_len, *self.eval_seq_lens])

    @property
    def num_train_items(self) -> int:
        return len(self.tokens["train"]) - self.seq_len

    def train_item(self, index: int, step: int | None = None) -> np.ndarray:
        window = self.tokens["train"][index : index + self.seq_len + 1]
        if step is None:
            return window
        # StochasTok re-splits already tokenized ids, so it works on the memory-mapped windows.
        return self.tokenizer.stochastok(window, self.training_rng(step, index))[: self.seq_len + 1]

    def collate_train(self, items: list[np.ndarray]) -> dict:
        windows = torch.from_numpy(np.stack(items).astype(np.int64))
        return {
            "input_ids": windows[:, :-1],
            "labels": windows[:, 1:],
            "attention_mask": torch.ones_like(windows[:, :-1]),
        }

    def _eval_loader(self, split: str, length: int) -> DataLoader:
        toks = self.tokens[split]
        n_windows = min((len(toks) - 1) // length, self.max_eval_windows)
        items = [toks[i * length : i * length + length + 1] for i in range(n_windows)]
        return self.eval_dataloader(items, self.collate_train)

    def _eval_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        """One loader of `seq_len` windows, then one per `eval_seq_lens` entry (dataloader
        index i+1 serves eval_seq_lens[i]), for perplexity at lengths beyond training's."""
        main = self._eval_loader(split, self.seq_len)
        if not self.eval_seq_lens:
            return main
        return [main, *(self._eval_loader(split, length) for length in self.eval_seq_lens)]

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders("test")
