"""`data=classification`: labelled texts from a local TSV/CSV file or a folder of split files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from lmlab.data.base import LMDataModule
from lmlab.data.collate import classification_batch
from lmlab.data.splits import stratified_split
from lmlab.data.tables import LabelledText, read_labelled_texts
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import build_tokenizer

log = logging.getLogger("lmlab")

# Names a split file may have inside a `data.path` folder (any of .tsv/.csv, optionally .gz).
SPLIT_FILE_NAMES = {"train": ("train",), "val": ("val", "dev", "valid", "validation"), "test": ("test",)}
SUFFIXES = (".tsv", ".csv", ".tsv.gz", ".csv.gz")


def _find_split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_FILE_NAMES[split]:
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), others alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


class ClassificationDataModule(LMDataModule):
    """Text classification: each example is ``<bos> text <eos>`` (truncated to `max_length`
    tokens) with one class id.

    `path` is one file (split into train/val/test, stratified by label, seeded) or a folder
    holding `train.tsv` and optionally `dev.tsv`/`val.tsv` and `test.tsv` (or .csv); explicit
    `train_path`/`val_path`/`test_path` replace it. A split without a file is carved out of the
    training file with `val_fraction`/`test_fraction` of every class. Class ids follow `labels`
    when given, else the sorted training labels; `label_names[i]` names class i.
    """

    kind = "classification"
    sampling = "permutation"

    def __init__(
        self,
        path: str | Path | None = None,
        train_path: str | Path | None = None,
        val_path: str | Path | None = None,
        test_path: str | Path | None = None,
        text_column: int | str = 1,
        label_column: int | str = 0,
        has_header: bool = True,
        delimiter: str = "auto",
        labels: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_length: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if path and train_path:
            raise ConfigError("data.train_path", str(train_path),
                              reason=f"give data.path or data.train_path, not both (data.path={str(path)!r})")
        if not path and not train_path:
            raise ConfigError("data.path", path, reason="data=classification needs a TSV/CSV file or a folder of "
                              "train/dev/test files (or data.train_path)")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 0.5:
                raise ConfigError(f"data.{name}", value, reason="must be in [0, 0.5)")
        if max_length < 3:
            raise ConfigError("data.max_length", max_length, reason="must be >= 3 (<bos>, a token, <eos>)")
        if labels is not None and len(set(map(str, labels))) != len(labels):
            raise ConfigError("data.labels", list(labels), reason="a label is listed twice")
        self.files = self._split_files(path, train_path, val_path, test_path)
        self.columns = {"text_column": text_column, "label_column": label_column,
                        "has_header": has_header, "delimiter": delimiter}
        self.given_labels = [str(v) for v in labels] if labels is not None else None
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.max_length = max_length
        #: texts cut to max_length, per split (also logged)
        self.truncated: dict[str, int] = {}

    @staticmethod
    def _split_files(path, train_path, val_path, test_path) -> dict[str, Path | None]:
        files: dict[str, Path | None] = {"train": None, "val": None, "test": None}
        if path:
            path = Path(path)
            if path.is_dir():
                files = {split: _find_split_file(path, split) for split in files}
                if files["train"] is None:
                    names = ", ".join(f"train{s}" for s in SUFFIXES)
                    raise DataError(path, f"folder has no training file (looked for {names})")
            else:
                files["train"] = path  # a missing file is reported, with its path, when read
        else:
            files["train"] = Path(train_path)
        for split, given in (("val", val_path), ("test", test_path)):
            if given:
                files[split] = Path(given)
        return files

    # -- reading ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        rows = {split: read_labelled_texts(f, **self.columns) for split, f in self.files.items() if f is not None}
        self.label_names = self.given_labels or _sorted_labels({r.label for r in rows["train"]})
        ids = {name: i for i, name in enumerate(self.label_names)}
        for split, split_rows in rows.items():
            for r in split_rows:
                if r.label not in ids:
                    known = "data.labels" if self.given_labels else "the training file's labels"
                    raise DataError(self.files[split], f"label {r.label!r} is not one of {known} "
                                    f"{self.label_names}", line=r.line)
        carve = {split: self.fractions[split] for split in ("val", "test") if split not in rows}
        if carve:
            train = rows["train"]
            parts = stratified_split([ids[r.label] for r in train], carve, self.seed)
            rows.update({split: [train[i] for i in idx] for split, idx in parts.items()})
        for split in ("val", "test"):
            if not rows[split]:
                raise ConfigError(f"data.{split}_fraction", self.fractions[split],
                                  reason=f"there is no {split} file, and this share of {self.files['train']} "
                                  "holds no example; raise it or give a file")
        if not rows["train"]:
            raise ConfigError("data.val_fraction", self.fractions["val"],
                              reason=f"no training examples of {self.files['train']} are left")
        self.rows: dict[str, list[LabelledText]] = rows
        if self.tokenizer is None:
            texts = [r.text for r in rows["train"]]
            self.tokenizer = build_tokenizer(self.tokenizer_config, texts, cache_dir=self.cache_dir)
        self.encoded = {split: self._encode(split, split_rows, ids) for split, split_rows in rows.items()}

    def _encode(self, split: str, rows: list[LabelledText], ids: dict[str, int]) -> list[tuple[list[int], int]]:
        tok = self.tokenizer
        room = self.max_length - 2
        encoded, truncated = [], 0
        for r, tokens in zip(rows, tok.encode_batch([r.text for r in rows])):
            truncated += len(tokens) > room
            encoded.append(([tok.bos_id, *tokens[:room], tok.eos_id], ids[r.label]))
        if truncated:
            log.info("%s split: %d of %d texts truncated to data.max_length=%d tokens",
                     split, truncated, len(rows), self.max_length)
        self.truncated[split] = truncated
        return encoded

    # -- what the run needs to know -----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def task_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}

    @property
    def max_sequence_length(self) -> int:
        return max(len(s) for enc in self.encoded.values() for s, _ in enc)

    def class_counts(self, split: str) -> list[int]:
        counts = [0] * self.num_classes
        for _, label in self.encoded[split]:
            counts[label] += 1
        return counts

    # -- batches -------------------------------------------------------------------------------
    @property
    def num_train_items(self) -> int:
        return len(self.encoded["train"])

    def train_item(self, index: int, step: int | None = None) -> tuple[list[int], int]:
        if step is None:
            return self.encoded["train"][index]
        tok, (_, label) = self.tokenizer, self.encoded["train"][index]
        tokens = tok.encode(self.rows["train"][index].text, training=True, rng=self.training_rng(step, index))
        return [tok.bos_id, *tokens[: self.max_length - 2], tok.eos_id], label

    def collate_train(self, items: list[tuple[list[int], int]]) -> dict:
        sequences, labels = zip(*items)
        return classification_batch(sequences, labels, self.tokenizer.pad_id)

    def _eval_loader(self, split: str) -> DataLoader:
        return self.eval_dataloader(self.encoded[split], self.collate_train)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
