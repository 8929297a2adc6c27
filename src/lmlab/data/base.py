"""What every lmlab data module shares: a tokenizer, step-reproducible training batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from lmlab.data.eval_sharding import eval_batches
from lmlab.data.sampling import StepBatchSampler
from lmlab.errors import ConfigError
from lmlab.tokenizers import Tokenizer, TokenizerConfig


class LMDataModule(L.LightningDataModule, ABC):
    """Base for lmlab data modules.

    `setup()` is idempotent and is called by `lmlab.train.run` *before* the model is built,
    because the backbone's vocabulary size comes from the tokenizer trained here.
    Subclasses set `self.tokenizer`, implement `_prepare()`, `train_item(i)`, `num_train_items`,
    `collate_train`, and the eval dataloaders.
    """

    #: the batch format served: "text" (plain corpus windows), "pairs" (prompt+target in one
    #: sequence), "seq2seq" (source and target apart) or "classification" (text + label)
    kind: str = "text"
    #: how training batches draw items: "permutation" (epochs over examples) or "random"
    sampling: str = "permutation"

    def __init__(
        self,
        tokenizer: TokenizerConfig | dict | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        pretrained_tokenizer: Tokenizer | None = None,
        limit_train_items: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError("data.batch_size", batch_size, reason="must be a positive integer")
        self.tokenizer_config = TokenizerConfig.from_dict(tokenizer or {}) if not isinstance(
            tokenizer, TokenizerConfig
        ) else tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.num_workers = num_workers
        self.tokenizer: Tokenizer | None = pretrained_tokenizer
        if limit_train_items is not None and limit_train_items < 1:
            raise ConfigError("data.limit_train_items", limit_train_items, reason="must be >= 1 or null")
        self.limit_train_items = limit_train_items
        self._prepared = False

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self._prepared:
            self._prepare()
            self._prepared = True

    @abstractmethod
    def _prepare(self) -> None:
        """Read the data, build (or reuse) the tokenizer, encode once."""

    # -- what the run needs to know before building the model -------------------------------
    @property
    @abstractmethod
    def max_sequence_length(self) -> int:
        """The longest input the backbone will be given (positions it must support)."""

    def sample_texts(self, max_chars: int = 1_000_000) -> list[str]:
        """Held-out raw texts (up to `max_chars`) on which the run's tokenizer is measured."""
        return []

    def task_kwargs(self) -> dict[str, Any]:
        """Hints for the task's constructor that only the data knows (e.g. the number of
        classes, the longest target); the task config's own non-null values take precedence."""
        return {}

    # -- training batches --------------------------------------------------------------------
    def _start_step(self) -> int:
        """Micro-batches already consumed: restored by Lightning before dataloaders are built."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        n_items = self.num_train_items
        if self.limit_train_items is not None:
            n_items = min(n_items, self.limit_train_items)
        sampler = StepBatchSampler(
            n_items,
            self.batch_size,
            seed=self.seed,
            start_step=self._start_step(),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            mode=self.sampling,
            with_step=self.stochastic_training,
        )
        return DataLoader(
            _IndexDataset(self),
            batch_sampler=sampler,
            collate_fn=self.collate_train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    # -- evaluation batches --------------------------------------------------------------------
    def eval_dataloader(self, items: Sequence[Any], collate_fn: Callable[[list[Any]], dict]) -> DataLoader:
        """Validation/test batches of `items`, in order; with several ranks this rank's share
        only (`lmlab.data.eval_sharding`)."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(_Numbered(items), batch_sampler=eval_batches(len(items), self.eval_batch_size, rank, world),
                          collate_fn=_NumberedCollate(collate_fn), pin_memory=self.pin_memory)

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches, so the copy to a GPU is asynchronous (Lightning moves them with
        non_blocking=True); on a CPU run pinning would only cost a copy."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    @property
    def stochastic_training(self) -> bool:
        """Training batches are re-tokenized with the tokenizer's sampling (BPE-dropout,
        Unigram sampling, StochasTok); evaluation always uses the deterministic ids."""
        return self.tokenizer is not None and self.tokenizer.is_stochastic

    def training_rng(self, step: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, index])

    @abstractmethod
    def train_item(self, index: int, step: int | None = None) -> Any:
        """Training item number `index` (what `collate_train` receives a list of); `step` is
        given when tokenization is stochastic, to seed it (see `training_rng`)."""

    @property
    @abstractmethod
    def num_train_items(self) -> int:
        """How many items the sampler chooses from."""

    @abstractmethod
    def collate_train(self, items: list[Any]) -> dict:
        """A list of items → a batch of tensors (see `lmlab.data.collate`)."""


class _Numbered:
    """Evaluation items with their index in the split."""

    def __init__(self, items: Sequence[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.items[index]


class _NumberedCollate:
    """A data module's collate, plus `eval_index`: each row's index in the split (a list of
    ints, which stays on the host), for what must not depend on how the split was batched or
    shared out across ranks (MLM's evaluation masks)."""

    def __init__(self, collate_fn: Callable[[list[Any]], dict]):
        self.collate_fn = collate_fn

    def __call__(self, numbered: list[tuple[int, Any]]) -> dict:
        batch = self.collate_fn([item for _, item in numbered])
        batch["eval_index"] = [index for index, _ in numbered]
        return batch


class _IndexDataset:
    """Map-style view of a data module's training items (the sampler chooses the indices)."""

    def __init__(self, dm: LMDataModule):
        self.dm = dm

    def __getitem__(self, key):
        if isinstance(key, tuple):  # (step, index) when tokenization is stochastic
            step, index = key
            return self.dm.train_item(index, step)
        return self.dm.train_item(key)


def capped_texts(texts, max_chars: int) -> list[str]:
    """The first texts of a stream, up to about `max_chars` characters in all."""
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out
