"""The Tokenizer contract every kind implements, and the special tokens they all share."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lmlab.tokenizers.config import NUM_SPECIAL_TOKENS, TokenizerConfig
from lmlab.tokenizers.storage import write_tokenizer_dir

# Fixed ids 0..5 for every kind, so tasks (padding, MLM masking, seq2seq separators) and saved
# models never depend on which tokenizer produced the data.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<sep>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID, SEP_ID = range(len(SPECIAL_TOKENS))
assert len(SPECIAL_TOKENS) == NUM_SPECIAL_TOKENS

# A zero-argument callable yielding the training texts; called once per pass so a corpus larger
# than memory can be streamed more than once.
TextStream = Callable[[], Iterable[str]]


class Tokenizer(ABC):
    """Text <-> ids. Special tokens sit at ids 0..5 in SPECIAL_TOKENS order for every kind.

    `encode` never adds special tokens and never produces one from text: the literal string
    "<eos>" in input text is ordinary text. Callers insert `bos_id`/`eos_id`/... themselves.
    `decode` maps ids outside [0, vocab_size) (a model's vocabulary is padded to a multiple of 64,
    so sampling can produce them) to `<unk>`, and by default drops every special id.
    """

    kind: ClassVar[str]
    #: True when build_tokenizer loaded this tokenizer from its cache instead of training it.
    from_cache: bool = False

    def __init__(self, config: TokenizerConfig):
        self.config = config

    # --- special tokens -------------------------------------------------------------------
    pad_id = property(lambda self: PAD_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)
    unk_id = property(lambda self: UNK_ID)
    mask_id = property(lambda self: MASK_ID)
    sep_id = property(lambda self: SEP_ID)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(NUM_SPECIAL_TOKENS))

    # --- what each kind implements --------------------------------------------------------
    @classmethod
    @abstractmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> Tokenizer:
        """Learn a vocabulary from the texts (kinds without one ignore them)."""

    @classmethod
    @abstractmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> Tokenizer:
        """Rebuild from what `save` wrote (`source` is the record's path, for error messages);
        raise DataError if it is inconsistent."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Real size including the special tokens (the backbone pads it)."""

    @property
    @abstractmethod
    def vocab(self) -> list[str]:
        """Every token string, indexed by id."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        """`ids` may be a list, a 1-D numpy array or a 1-D torch tensor."""

    @abstractmethod
    def id_to_token(self, i: int) -> str | None:
        """The token string, or None for an id outside [0, vocab_size)."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id, or None if the token is not in the vocabulary."""

    def side_files(self) -> dict[str, str]:
        """Extra files `save` writes next to the record (name -> text)."""
        return {}

    # --- shared behaviour -----------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_batch(
        self, batch: Iterable[Sequence[int] | Any], skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write everything `load_tokenizer(directory)` needs, atomically; return the directory."""
        record = {
            "kind": self.kind,
            "config": self.config.to_dict(),
            "vocab_size": self.vocab_size,
            "vocab": self.vocab,
        }
        return write_tokenizer_dir(directory, record, self.side_files())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"

    # --- helpers for numpy-backed kinds ---------------------------------------------------
    def _ids_array(self, ids: Sequence[int] | Any) -> np.ndarray:
        """1-D int64 array with out-of-range ids replaced by unk."""
        if hasattr(
            ids, "detach"
        ):  # torch tensor, possibly on an accelerator; avoids importing torch
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(
                f"decode takes one sequence of ids (1-D), got shape {arr.shape}; use decode_batch"
            )
        return np.where((arr < 0) | (arr >= self.vocab_size), UNK_ID, arr)

    def _decode_around_specials(
        self,
        ids: Sequence[int] | Any,
        skip_special_tokens: bool,
        decode_plain: Callable[[np.ndarray], str],
    ) -> str:
        """Decode runs of ordinary ids with `decode_plain` (vectorised), specials by name.

        Only the positions of special ids are visited in Python, so ordinary text stays a single
        vectorised call per run.
        """
        arr = self._ids_array(ids)
        special = arr < NUM_SPECIAL_TOKENS
        if skip_special_tokens:
            return decode_plain(arr[~special])
        parts: list[str] = []
        start = 0
        for pos in np.flatnonzero(special):
            parts.append(decode_plain(arr[start:pos]))
            parts.append(SPECIAL_TOKENS[arr[pos]])
            start = pos + 1
        parts.append(decode_plain(arr[start:]))
        return "".join(parts)
