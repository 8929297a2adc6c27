"""The Tokenizer contract every kind implements, and the special tokens they all share."""

from __future__ import annotations

import os
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lmlab.tokenizers.config import NUM_SPECIAL_TOKENS, TokenizerConfig
from lmlab.tokenizers.stochastok import SplitTable, apply_splits, build_split_table
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
    """Text <-> ids. Special tokens sit at ids 0..5 in SPECIAL_TOKENS order for every kind, then
    the config's extra `special_tokens` at 6, 7, ...

    `encode` never adds special tokens and never produces one from text: the literal string
    "<eos>" in input text is ordinary text. Callers insert `bos_id`/`eos_id`/... themselves.
    `decode` maps ids outside [0, vocab_size) (a model's vocabulary is padded to a multiple of 64,
    so sampling can produce them) to `<unk>`, and by default drops every special id.

    `encode(..., training=True)` samples a segmentation when the config asks for BPE-dropout,
    Unigram sampling or StochasTok; without `training` (evaluation, the token cache) encoding is
    deterministic. Sampled ids always decode to the same text as the deterministic ones.
    """

    kind: ClassVar[str]
    #: True when build_tokenizer loaded this tokenizer from its cache instead of training it.
    from_cache: bool = False

    def __init__(self, config: TokenizerConfig):
        self.config = config
        self.specials: tuple[str, ...] = (*SPECIAL_TOKENS, *config.special_tokens)
        self._split_table: SplitTable | None = None

    # --- special tokens -------------------------------------------------------------------
    pad_id = property(lambda self: PAD_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)
    unk_id = property(lambda self: UNK_ID)
    mask_id = property(lambda self: MASK_ID)
    sep_id = property(lambda self: SEP_ID)

    @property
    def num_special_tokens(self) -> int:
        return len(self.specials)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(self.num_special_tokens))

    @property
    def unknown_ids(self) -> frozenset[int]:
        """Ids that stand for text the vocabulary cannot spell: <unk>, and a given file's own."""
        return frozenset({UNK_ID})

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

    @classmethod
    def needs_training_text(cls, config: TokenizerConfig) -> bool:
        """False for kinds that learn nothing (byte) or read a given file (hf, sentencepiece)."""
        return True

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Real size including the special tokens (the backbone pads it)."""

    @property
    @abstractmethod
    def vocab(self) -> list[str]:
        """Every token string, indexed by id."""

    @abstractmethod
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Deterministic ids of each text."""

    @abstractmethod
    def encode_to_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """Deterministic ids of one (possibly huge) text as one array; equal to encode(text).

        The data pipeline's path: kinds backed by a library cut the text at safe boundaries and
        encode the pieces as one parallel batch, numpy kinds encode it in one vectorised pass.
        """

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

    def _sample_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids with the library's sampled segmentation (BPE-dropout, Unigram sampling); kinds
        that cannot sample encode deterministically."""
        return self._encode_batch(texts)

    def _stochastok_vocabulary(self) -> tuple[list[str], np.ndarray, str | None]:
        """(token strings by id, which ids may be split or be a part, WordPiece prefix)."""
        return self.vocab, np.zeros(self.vocab_size, dtype=bool), None

    # --- shared behaviour -----------------------------------------------------------------
    @property
    def is_stochastic(self) -> bool:
        """Whether `training=True` encoding differs from deterministic encoding."""
        c = self.config
        return bool(c.dropout or c.alpha or c.stochastok)

    def encode(
        self, text: str, training: bool = False, rng: np.random.Generator | None = None
    ) -> list[int]:
        return self.encode_batch([text], training=training, rng=rng)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        training: bool = False,
        rng: np.random.Generator | None = None,
    ) -> list[list[int]]:
        """Ids of each text; with `training`, a sampled segmentation (see the class doc).

        `rng` drives StochasTok (default: a fresh unseeded generator). The libraries' own
        BPE-dropout and Unigram sampling draw from their internal generators, which cannot be
        seeded per call.
        """
        texts = list(texts)
        if not (training and self.is_stochastic):
            return self._encode_batch(texts)
        sampled = (
            self._sample_batch(texts)
            if (self.config.dropout or self.config.alpha)
            else self._encode_batch(texts)
        )
        if not self.config.stochastok:
            return sampled
        rng = rng if rng is not None else np.random.default_rng()
        return [self.stochastok(np.asarray(ids), rng).tolist() for ids in sampled]

    def stochastok(self, ids: Sequence[int] | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """StochasTok-split already tokenized ids (e.g. a training window) at `config.stochastok`.

        Returns a longer or equal int64 array that decodes to the same text.
        """
        if self._split_table is None:
            self._split_table = build_split_table(*self._stochastok_vocabulary())
        return apply_splits(np.asarray(ids), self._split_table, self.config.stochastok, rng)

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

    def __getstate__(self) -> dict[str, Any]:
        # The split table is derived from the vocabulary; workers rebuild it if they need it.
        return {**self.__dict__, "_split_table": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"

    # --- helpers for numpy-backed kinds ---------------------------------------------------
    def _normalize_text(self, text: str) -> str:
        """The config's normalisation and lowercasing, for kinds without a library pipeline."""
        form = self.config.effective_normalization
        if form != "none":
            text = unicodedata.normalize(form.upper(), text)
        return text.lower() if self.config.lowercase else text

    def _ids_array(self, ids: Sequence[int] | Any) -> np.ndarray:
        """1-D int64 array with out-of-range ids replaced by unk."""
        if hasattr(ids, "detach"):  # torch tensor, possibly on an accelerator; avoids torch import
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
        special = arr < self.num_special_tokens
        if skip_special_tokens:
            return decode_plain(arr[~special])
        parts: list[str] = []
        start = 0
        for pos in np.flatnonzero(special):
            parts.append(decode_plain(arr[start:pos]))
            parts.append(self.specials[arr[pos]])
            start = pos + 1
        parts.append(decode_plain(arr[start:]))
        return "".join(parts)
