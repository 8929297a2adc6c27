"""`data=parallel`: line-aligned source/target text files (plain or .gz) for seq2seq."""

from __future__ import annotations

import logging
from pathlib import Path

from lmlab.data.pairs import PairsDataModule
from lmlab.data.reading import read_lines
from lmlab.data.splits import stratified_split
from lmlab.data.synthetic import Example
from lmlab.errors import ConfigError, DataError

log = logging.getLogger("lmlab")


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[Example], int]:
    """Pairs (line i of source, line i of target) and how many were dropped as empty.

    A pair whose source or target line is empty (or only whitespace) is dropped: there is
    nothing to translate or nothing to learn, and blank lines in a corpus are usually stray
    separators. Different line counts mean the files are not aligned: DataError naming both.
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            src_path, f"has {len(src)} lines but its target file {tgt_path} has {len(tgt)}; "
            "parallel files must be line-aligned (line i of one translates line i of the other)",
        )
    pairs = [Example("", s.strip(), t.strip()) for s, t in zip(src, tgt)]
    kept = [p for p in pairs if p.source and p.target]
    if not kept:
        raise DataError(src_path, f"no line pair with text on both sides (target file {tgt_path})")
    return kept, len(pairs) - len(kept)


class ParallelTextDataModule(PairsDataModule):
    """Translation-style pairs in the seq2seq format (kind "seq2seq").

    Each split is a pair of line-aligned files; a split without files (val/test paths null) is
    a seeded random share of the training pairs. The encoder reads ``source <eos>`` and the
    decoder ``<bos> target``, each cut to `max_length` tokens (counted and logged); evaluation
    scores against the untouched target lines. The tokenizer is trained on both sides of the
    training pairs: one shared vocabulary, as tied source/target embeddings need.
    """

    format = "seq2seq"
    has_task_names = False

    def __init__(
        self,
        train_src_path: str | Path = "",
        train_tgt_path: str | Path = "",
        val_src_path: str | Path | None = None,
        val_tgt_path: str | Path | None = None,
        test_src_path: str | Path | None = None,
        test_tgt_path: str | Path | None = None,
        max_length: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("train_src_path", train_src_path), ("train_tgt_path", train_tgt_path)):
            if not value:
                raise ConfigError(f"data.{name}", value, reason="data=parallel needs line-aligned source and "
                                  "target training files (.txt or .gz)")
        self.paths = {"train": (Path(train_src_path), Path(train_tgt_path))}
        for split, src, tgt in (("val", val_src_path, val_tgt_path), ("test", test_src_path, test_tgt_path)):
            if bool(src) != bool(tgt):
                missing = f"data.{split}_tgt_path" if src else f"data.{split}_src_path"
                raise ConfigError(missing, None, reason=f"data.{split}_src_path and data.{split}_tgt_path "
                                  "come together (or both null to split them off the training pairs)")
            if src:
                self.paths[split] = (Path(src), Path(tgt))
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 0.5:
                raise ConfigError(f"data.{name}", value, reason="must be in (0, 0.5)")
        if max_length < 2:
            raise ConfigError("data.max_length", max_length, reason="must be >= 2 (a token and <eos>)")
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.max_length = max_length
        #: pairs dropped as empty and sequences cut to max_length, per split (also logged)
        self.dropped: dict[str, int] = {}
        self.truncated: dict[str, int] = {}

    def _prepare(self) -> None:
        self.splits = {}
        for split, (src, tgt) in self.paths.items():
            self.splits[split], self.dropped[split] = read_parallel(src, tgt)
        carve = {split: self.fractions[split] for split in ("val", "test") if split not in self.splits}
        if carve:
            train = self.splits["train"]
            parts = stratified_split([0] * len(train), carve, self.seed)
            self.splits.update({split: [train[i] for i in idx] for split, idx in parts.items()})
        for split, n in self.dropped.items():
            if n:
                log.warning("%s: dropped %d line pair(s) with an empty side", split, n)
        self._tokenize_splits()

    def _frame_split(self, split: str, sources: list[list[int]], targets: list[list[int]]):
        # Both sides hold at most max_length tokens: <eos> ends the source, and the decoder
        # reads <bos> + target (tgt_out is target + <eos>).
        room = self.max_length - 1
        eos = self.tokenizer.eos_id
        self.truncated[split] = sum(len(s) > room or len(t) > room for s, t in zip(sources, targets))
        if self.truncated[split]:
            log.info("%s: %d of %d pairs cut to data.max_length=%d tokens", split, self.truncated[split],
                     len(sources), self.max_length)
        return [([*s[:room], eos], t[:room]) for s, t in zip(sources, targets)]
