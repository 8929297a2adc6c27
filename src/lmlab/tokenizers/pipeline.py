"""PipelineTokenizer: a Tokenizer whose whole pipeline is a `tokenizers.Tokenizer`.

The trained kinds (word, bpe, bytelevel_bpe, wordpiece, unigram) differ only in how the library
pipeline is assembled and trained; `hf` reads one from a file. Encoding (batched and parallel in
Rust), sampling, decoding and persistence (the library's own `tokenizer.json`) live here.

A file whose ids 0..n-1 are not lmlab's specials (any tokenizer.json from elsewhere) keeps its
ids shifted up by `id_offset` = the number of specials, which then sit at 0..n-1 outside the
library: `lmlab id = file id + id_offset`.
"""

from __future__ import annotations

import array
import re
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as LibraryTokenizer

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers.base import SPECIAL_TOKENS, TextStream, Tokenizer
from lmlab.tokenizers.chunking import (
    Continuation,
    batches,
    continued_pieces,
    find_continuation,
)
from lmlab.tokenizers.config import TokenizerConfig

LIBRARY_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class PipelineTokenizer(Tokenizer):
    #: The library model's sampling knob for each config field, by model type.
    _SAMPLING = {"BPE": "dropout", "Unigram": "alpha"}

    def __init__(
        self, config: TokenizerConfig, library: LibraryTokenizer, allow_offset: bool = False
    ):
        super().__init__(config)
        # Text must never turn into special ids: "<eos>" typed in a corpus is text, and the
        # data pipeline places specials by id. The flag is not serialised, so set it on every
        # construction (after training and after loading).
        library.encode_special_tokens = True
        self._library = library
        self._sampler: LibraryTokenizer | None = None
        self._continuation: Continuation | None | bool = False  # False: not probed yet
        n = self.num_special_tokens
        found = tuple(library.id_to_token(i) for i in range(n))
        if found == self.specials:
            self.id_offset = 0
        elif allow_offset:
            self.id_offset = n
        else:
            raise DataError(
                LIBRARY_FILE,
                f"special tokens at ids 0..{n - 1} are {found}, expected {self.specials}",
            )
        self._check_sampling()

    def __getstate__(self) -> dict[str, Any]:
        # The sampler is rebuilt on first use: its JSON form loses a Unigram model's alpha.
        return {**super().__getstate__(), "_sampler": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The library pickles through its JSON form, which drops the flag: without this, a
        # DataLoader worker's copy would turn "<eos>" in text into the special id.
        self.__dict__.update(state)
        self._library.encode_special_tokens = True

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> PipelineTokenizer:
        if LIBRARY_FILE not in files:
            raise DataError(
                source, f"a {cls.kind} tokenizer needs {LIBRARY_FILE} listed in its record"
            )
        tokenizer = cls(
            config, library_from_json(files[LIBRARY_FILE], source.parent / LIBRARY_FILE)
        )
        if tokenizer.vocab != record["vocab"]:
            raise DataError(source, f"vocabulary in the record disagrees with {LIBRARY_FILE}")
        return tokenizer

    @property
    def library(self) -> LibraryTokenizer:
        """The wrapped `tokenizers.Tokenizer` (e.g. for `transformers.PreTrainedTokenizerFast`).

        Its ids are lmlab's minus `id_offset`.
        """
        return self._library

    @property
    def model_type(self) -> str:
        return type(self._library.model).__name__

    @property
    def unknown_ids(self) -> frozenset[int]:
        own = getattr(self._library.model, "unk_token", None)
        own_id = self._library.token_to_id(own) if own else None
        if own_id is None:
            return super().unknown_ids
        return frozenset({*super().unknown_ids, own_id + self.id_offset})

    @property
    def vocab_size(self) -> int:
        return self.id_offset + self._library.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> list[str]:
        by_token = self._library.get_vocab(with_added_tokens=True)
        tokens = sorted(by_token, key=by_token.__getitem__)
        if [by_token[t] for t in tokens] != list(range(len(tokens))):
            raise DataError(LIBRARY_FILE, "token ids are not 0..n-1 without gaps")
        return [*self.specials, *tokens] if self.id_offset else tokens

    # --- encoding ---------------------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._ids_of(self._library, texts)

    def _sample_batch(self, texts: list[str]) -> list[list[int]]:
        if self._sampler is None:
            self._sampler = LibraryTokenizer.from_str(self._library.to_str())
            self._sampler.encode_special_tokens = True
            field = self._SAMPLING[self.model_type]
            setattr(self._sampler.model, field, getattr(self.config, field))
        return self._ids_of(self._sampler, texts)

    def _ids_of(self, library: LibraryTokenizer, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips the character offsets, which ids do not need.
        encodings = library.encode_batch_fast(texts, add_special_tokens=False)
        if not self.id_offset:
            return [e.ids for e in encodings]
        return [(np.asarray(e.ids, dtype=np.int64) + self.id_offset).tolist() for e in encodings]

    @property
    def continuation(self) -> Continuation | None:
        """How `encode_to_array` encodes a cut piece (None: this pipeline is never cut)."""
        if self._continuation is False:
            self._continuation = find_continuation(self._plain_ids)
        return self._continuation

    def encode_to_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        continuation = self.continuation
        drop = continuation.drop if continuation else 0
        # The library hands ids out only as Python lists; array("I").fromlist converts one in C
        # at ~10 ns an id (np.fromiter over all the lists: ~35 ns, 4 % of word's encoding time).
        # Only one group's encodings and lists are alive at a time.
        ids = array.array("I")
        for first, batch in batches(continued_pieces(text, continuation)):
            encodings = self._library.encode_batch_fast(batch, add_special_tokens=False)
            for i, encoding in enumerate(encodings, first):
                piece = encoding.ids
                if i and drop:
                    del piece[:drop]
                ids.fromlist(piece)
        out = np.frombuffer(ids, dtype=np.uintc).astype(dtype, copy=False)
        if self.id_offset:
            out += self.id_offset
        return out

    def _plain_ids(self, text: str) -> list[int]:
        return self._library.encode(text, add_special_tokens=False).ids

    # --- decoding and lookups ---------------------------------------------------------------
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if self.id_offset:
            return self._decode_around_specials(ids, skip_special_tokens, self._decode_shifted)
        return self._library.decode(
            self._ids_array(ids).tolist(), skip_special_tokens=skip_special_tokens
        )

    def decode_batch(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        if self.id_offset:
            return super().decode_batch(batch, skip_special_tokens)
        clean = [self._ids_array(ids).tolist() for ids in batch]
        return self._library.decode_batch(clean, skip_special_tokens=skip_special_tokens)

    def _decode_shifted(self, ids: np.ndarray) -> str:
        # The file's own specials (e.g. "<|endoftext|>") are never shown: lmlab's are the ones
        # `skip_special_tokens=False` is about.
        return self._library.decode((ids - self.id_offset).tolist(), skip_special_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        if not 0 <= i < self.vocab_size:
            return None
        if i < self.id_offset:
            return self.specials[i]
        return self._library.id_to_token(i - self.id_offset)

    def token_to_id(self, token: str) -> int | None:
        if self.id_offset and token in self.specials:
            return self.specials.index(token)
        i = self._library.token_to_id(token)
        return None if i is None else i + self.id_offset

    def side_files(self) -> dict[str, str]:
        return {LIBRARY_FILE: self._library.to_str()}

    # --- stochastic encoding ----------------------------------------------------------------
    def _check_sampling(self) -> None:
        supported = self._SAMPLING.get(self.model_type)
        for field in ("dropout", "alpha"):
            if getattr(self.config, field) and field != supported:
                raise ConfigError(
                    f"tokenizer.{field}",
                    getattr(self.config, field),
                    f"0 / null; this {self.model_type} model samples with "
                    f"{supported or 'neither dropout nor alpha'}",
                    f"a {self.model_type} model cannot sample this way",
                )
        if self.config.stochastok and self.model_type not in ("BPE", "Unigram", "WordPiece"):
            raise ConfigError(
                "tokenizer.stochastok",
                self.config.stochastok,
                "0 for a word-level vocabulary",
                "word-level tokens have no sub-tokens that decode to the same text",
            )

    def _stochastok_vocabulary(self) -> tuple[list[str], np.ndarray, str | None]:
        vocab = self.vocab
        usable = np.ones(len(vocab), dtype=bool)
        usable[: self.num_special_tokens] = False
        for token in self._library.get_added_tokens_decoder().values():
            usable[self.token_to_id(token.content)] = False
        model = self._library.model
        if getattr(model, "byte_fallback", False):
            usable &= np.array([not _BYTE_PIECE.fullmatch(t) for t in vocab])
        prefix = model.continuing_subword_prefix if self.model_type == "WordPiece" else None
        return vocab, usable, prefix


class TrainedPipelineTokenizer(PipelineTokenizer):
    """A pipeline assembled from the config and trained on the run's text."""

    @classmethod
    @abstractmethod
    def build_pipeline(cls, config: TokenizerConfig) -> tuple[LibraryTokenizer, Any]:
        """An untrained library tokenizer and the trainer that fits it, both from the config."""

    @staticmethod
    def special_strings(config: TokenizerConfig) -> list[str]:
        """The specials a trainer places first, so they get ids 0..n-1."""
        return [*SPECIAL_TOKENS, *config.special_tokens]

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> PipelineTokenizer:
        library, trainer = cls.build_pipeline(config)
        library.train_from_iterator(texts(), trainer=trainer)
        return cls(config, library)


def library_from_json(text: str, source: Path | str) -> LibraryTokenizer:
    """Parse a tokenizer.json, or raise DataError naming the file."""
    try:
        return LibraryTokenizer.from_str(text)
    except Exception as exc:  # the library raises bare Exception on malformed JSON
        raise DataError(source, f"not a valid `tokenizers` file ({exc})") from exc


def vocab_too_small(config: TokenizerConfig, alphabet: int, note: str) -> ConfigError:
    """The error for a vocab_size that cannot hold the training text's alphabet."""
    floor = alphabet + config.num_special_tokens
    return ConfigError(
        "tokenizer.vocab_size",
        config.vocab_size,
        f"an integer >= {floor}",
        f"the training text has an alphabet of {alphabet} characters ({note}); {config.kind} "
        f"needs room for them plus the {config.num_special_tokens} special tokens",
    )
