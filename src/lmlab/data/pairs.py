"""Prompt → target examples as a causal-LM data module (the synthetic tasks use it)."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import DataLoader

from lmlab.data.base import LMDataModule
from lmlab.data.collate import causal_lm_batch, pad_left
from lmlab.data.synthetic import Example, make_splits, validate_task_names
from lmlab.errors import ConfigError
from lmlab.tokenizers import build_tokenizer


class PairsDataModule(LMDataModule):
    """Each example becomes ``<bos> source <sep> target <eos>``; loss is taken on target+eos.

    Evaluation batches also carry the left-padded prompts (``<bos> source <sep>``), the target
    strings and the task names, so the task can score exact match by greedy generation.
    """

    kind = "pairs"
    sampling = "permutation"

    splits: dict[str, list[Example]]

    def _tokenize_splits(self) -> None:
        if self.tokenizer is None:
            train = self.splits["train"]
            texts = [e.source for e in train] + [e.target for e in train]
            self.tokenizer = build_tokenizer(self.tokenizer_config, texts, cache_dir=self.cache_dir)
        tok = self.tokenizer
        self.encoded: dict[str, list[tuple[list[int], list[int]]]] = {}
        for split, examples in self.splits.items():
            src = tok.encode_batch([e.source for e in examples])
            tgt = tok.encode_batch([e.target for e in examples])
            self.encoded[split] = [
                ([tok.bos_id, *s, tok.sep_id], [*t, tok.eos_id]) for s, t in zip(src, tgt)
            ]

    @property
    def max_sequence_length(self) -> int:
        # input_ids drop the final token of prompt+target
        return max(len(p) + len(t) - 1 for enc in self.encoded.values() for p, t in enc)

    @property
    def max_target_length(self) -> int:
        return max(len(t) for enc in self.encoded.values() for _, t in enc)

    @property
    def num_train_items(self) -> int:
        return len(self.encoded["train"])

    def train_item(self, index: int):
        return self.encoded["train"][index]

    def collate_train(self, items: Sequence[tuple[list[int], list[int]]]) -> dict:
        prompts, targets = zip(*items)
        return causal_lm_batch(prompts, targets, self.tokenizer.pad_id)

    def _collate_eval(self, items: Sequence[tuple[tuple[list[int], list[int]], Example]]) -> dict:
        encoded, examples = zip(*items)
        prompts, targets = zip(*encoded)
        batch = causal_lm_batch(prompts, targets, self.tokenizer.pad_id)
        batch["prompt_ids"], batch["prompt_mask"] = pad_left(prompts, self.tokenizer.pad_id)
        batch["target_text"] = [e.target for e in examples]
        batch["task"] = [e.task for e in examples]
        return batch

    def _eval_loader(self, split: str) -> DataLoader:
        items = list(zip(self.encoded[split], self.splits[split]))
        return DataLoader(items, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collate_eval)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    @property
    def task_names(self) -> list[str]:
        return sorted({e.task for e in self.splits["test"]} | {e.task for e in self.splits["val"]})


class SyntheticTasksDataModule(PairsDataModule):
    """`data=synthetic`: the prompt-named integer-sequence tasks of `lmlab.data.synthetic`."""

    def __init__(
        self,
        tasks: Sequence[str] = ("sort_asc", "sort_desc", "add_1", "add_2"),
        n_numbers: int = 4,
        low: int = 1,
        high: int = 100,
        n_train: int = 5000,
        n_val: int = 200,
        n_test: int = 200,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.tasks = validate_task_names(tasks)
        if n_numbers < 1:
            raise ConfigError("data.n_numbers", n_numbers, reason="must be >= 1")
        if high < low:
            raise ConfigError("data.high", high, reason=f"must be >= data.low={low}")
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value < 1:
                raise ConfigError(f"data.{name}", value, reason="must be >= 1")
        possible = (high - low + 1) ** n_numbers
        if n_train + n_val + n_test > possible:
            raise ConfigError(
                "data.n_train", n_train,
                reason=f"n_train+n_val+n_test={n_train + n_val + n_test} exceeds the {possible} distinct "
                f"inputs of {n_numbers} numbers in {low}..{high} per task",
            )
        self.n_numbers, self.low, self.high = n_numbers, low, high
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}

    def _prepare(self) -> None:
        self.splits = make_splits(self.tasks, self.n_numbers, self.low, self.high, self.sizes, self.seed)
        self._tokenize_splits()
