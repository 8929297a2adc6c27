"""Source → target examples for a decoder (prompt+target) or an encoder-decoder (pairs)."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import DataLoader

from lmlab.data.base import LMDataModule, capped_texts
from lmlab.data.collate import causal_lm_batch, pad_left, seq2seq_batch
from lmlab.data.synthetic import Example, make_splits, validate_task_names
from lmlab.errors import ConfigError, check_choice
from lmlab.tokenizers import build_tokenizer

FORMATS = ("auto", "clm", "seq2seq")


class PairsDataModule(LMDataModule):
    """Source → target examples, served in one of two formats.

    format="clm" (kind "pairs"): each example is ``<bos> source <sep> target <eos>`` for a
    decoder; loss is taken on target+eos. Evaluation batches also carry the left-padded prompts
    (``<bos> source <sep>``) so the task can score exact match by greedy generation.

    format="seq2seq" (kind "seq2seq"): the encoder reads ``source <eos>``, the decoder is
    teacher-forced on ``<bos> target`` → ``target <eos>`` (see `collate.seq2seq_batch`).

    Evaluation batches of both formats carry the target strings, and the task names when the
    examples have them (synthetic data), for per-task exact match.
    """

    sampling = "permutation"
    #: "clm" or "seq2seq"; subclasses set it before `_tokenize_splits`
    format: str = "clm"
    #: whether batches carry each example's task name (synthetic data: one name per task)
    has_task_names: bool = True

    splits: dict[str, list[Example]]

    @property
    def kind(self) -> str:
        return "seq2seq" if self.format == "seq2seq" else "pairs"

    def _tokenize_splits(self) -> None:
        if self.tokenizer is None:
            # Both sides: an encoder-decoder shares one vocabulary (and embedding) across them.
            train = self.splits["train"]
            texts = [e.source for e in train] + [e.target for e in train]
            self.tokenizer = build_tokenizer(self.tokenizer_config, texts, cache_dir=self.cache_dir)
        tok = self.tokenizer
        self.encoded: dict[str, list[tuple[list[int], list[int]]]] = {}
        for split, examples in self.splits.items():
            src = tok.encode_batch([e.source for e in examples])
            tgt = tok.encode_batch([e.target for e in examples])
            self.encoded[split] = self._frame_split(split, src, tgt)

    def _frame_split(self, split: str, sources: list[list[int]], targets: list[list[int]]):
        return [self._frame(s, t) for s, t in zip(sources, targets)]

    def _frame(self, source: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """Token ids of one example → (what the model reads first, the target part)."""
        tok = self.tokenizer
        if self.format == "seq2seq":
            return [*source, tok.eos_id], target
        return [tok.bos_id, *source, tok.sep_id], [*target, tok.eos_id]

    @property
    def max_sequence_length(self) -> int:
        pairs = [pair for enc in self.encoded.values() for pair in enc]
        if self.format == "seq2seq":
            # the decoder reads <bos>+target, the encoder the framed source
            return max(max(len(s), len(t) + 1) for s, t in pairs)
        # input_ids drop the final token of prompt+target
        return max(len(p) + len(t) - 1 for p, t in pairs)

    @property
    def max_target_length(self) -> int:
        """Most tokens a model must generate for one target, <eos> included."""
        extra = 1 if self.format == "seq2seq" else 0  # clm targets already end in <eos>
        return max(len(t) + extra for enc in self.encoded.values() for _, t in enc)

    def sample_texts(self, max_chars: int = 1_000_000) -> list[str]:
        return capped_texts((t for e in self.splits["val"] for t in (e.source, e.target)), max_chars)

    def task_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_target_length}

    @property
    def num_train_items(self) -> int:
        return len(self.encoded["train"])

    def train_item(self, index: int, step: int | None = None):
        if step is None:
            return self.encoded["train"][index]
        example, rng = self.splits["train"][index], self.training_rng(step, index)
        tok = self.tokenizer
        return self._frame(tok.encode(example.source, training=True, rng=rng),
                           tok.encode(example.target, training=True, rng=rng))

    def collate_train(self, items: Sequence[tuple[list[int], list[int]]]) -> dict:
        firsts, targets = zip(*items)
        tok = self.tokenizer
        if self.format == "seq2seq":
            return seq2seq_batch(firsts, targets, tok.bos_id, tok.eos_id, tok.pad_id)
        return causal_lm_batch(firsts, targets, tok.pad_id)

    def _collate_eval(self, items: Sequence[tuple[tuple[list[int], list[int]], Example]]) -> dict:
        encoded, examples = zip(*items)
        batch = self.collate_train(encoded)
        if self.format == "clm":
            prompts = [p for p, _ in encoded]
            batch["prompt_ids"], batch["prompt_mask"] = pad_left(prompts, self.tokenizer.pad_id)
        batch["target_text"] = [e.target for e in examples]
        if self.has_task_names:
            batch["task"] = [e.task for e in examples]
        return batch

    def _eval_loader(self, split: str) -> DataLoader:
        items = list(zip(self.encoded[split], self.splits[split]))
        return self.eval_dataloader(items, self._collate_eval)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    @property
    def task_names(self) -> list[str]:
        return sorted({e.task for e in self.splits["test"]} | {e.task for e in self.splits["val"]})


class SyntheticTasksDataModule(PairsDataModule):
    """`data=synthetic`: the prompt-named integer-sequence tasks of `lmlab.data.synthetic`.

    `format`: "clm" (prompt and target in one sequence, for decoders), "seq2seq" (source and
    target apart, for encoder-decoders) or "auto" (= clm; the run assembly picks seq2seq when
    the task is seq2seq).
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("sort_asc", "sort_desc", "add_1", "add_2"),
        n_numbers: int = 4,
        low: int = 1,
        high: int = 100,
        n_train: int = 5000,
        n_val: int = 200,
        n_test: int = 200,
        format: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("data.format", format, FORMATS)
        self.format = "clm" if format == "auto" else format
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
