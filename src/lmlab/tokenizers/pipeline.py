"""PipelineTokenizer: a Tokenizer whose whole pipeline is a trained `tokenizers.Tokenizer`.

Word-level and BPE differ only in how the library pipeline is assembled and trained; encoding
(batched and parallel in Rust), decoding and persistence (the library's own `tokenizer.json`)
are the same and live here.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as LibraryTokenizer

from lmlab.errors import DataError
from lmlab.tokenizers.base import SPECIAL_TOKENS, TextStream, Tokenizer
from lmlab.tokenizers.config import TokenizerConfig

LIBRARY_FILE = "tokenizer.json"


class PipelineTokenizer(Tokenizer):
    def __init__(self, config: TokenizerConfig, library: LibraryTokenizer):
        super().__init__(config)
        # Text must never turn into special ids: "<eos>" typed in a corpus is text, and the
        # data pipeline places specials by id. The flag is not serialised, so set it on every
        # construction (after training and after loading).
        library.encode_special_tokens = True
        self._library = library
        found = [library.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
        if tuple(found) != SPECIAL_TOKENS:
            raise DataError(
                LIBRARY_FILE,
                f"special tokens at ids 0..5 are {found}, expected {list(SPECIAL_TOKENS)}",
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The library pickles through its JSON form, which drops the flag: without this, a
        # DataLoader worker's copy would turn "<eos>" in text into the special id.
        self.__dict__.update(state)
        self._library.encode_special_tokens = True

    @classmethod
    @abstractmethod
    def build_pipeline(cls, config: TokenizerConfig) -> tuple[LibraryTokenizer, Any]:
        """An untrained library tokenizer and the trainer that fits it, both from the config."""

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> PipelineTokenizer:
        library, trainer = cls.build_pipeline(config)
        library.train_from_iterator(texts(), trainer=trainer)
        return cls(config, library)

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> PipelineTokenizer:
        if LIBRARY_FILE not in files:
            raise DataError(
                source, f"a {cls.kind} tokenizer needs {LIBRARY_FILE} listed in its record"
            )
        try:
            library = LibraryTokenizer.from_str(files[LIBRARY_FILE])
        except Exception as exc:  # the library raises bare Exception on malformed JSON
            raise DataError(
                source.parent / LIBRARY_FILE, f"not a valid `tokenizers` file ({exc})"
            ) from exc
        tokenizer = cls(config, library)
        if tokenizer.vocab != record["vocab"]:
            raise DataError(source, f"vocabulary in the record disagrees with {LIBRARY_FILE}")
        return tokenizer

    @property
    def library(self) -> LibraryTokenizer:
        """The wrapped `tokenizers.Tokenizer` (e.g. for `transformers.PreTrainedTokenizerFast`)."""
        return self._library

    @property
    def vocab_size(self) -> int:
        return self._library.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> list[str]:
        by_token = self._library.get_vocab(with_added_tokens=True)
        return sorted(by_token, key=by_token.__getitem__)

    def encode(self, text: str) -> list[int]:
        return self._library.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [
            enc.ids for enc in self._library.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self._library.decode(
            self._ids_array(ids).tolist(), skip_special_tokens=skip_special_tokens
        )

    def decode_batch(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        clean = [self._ids_array(ids).tolist() for ids in batch]
        return self._library.decode_batch(clean, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._library.id_to_token(i) if 0 <= i < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        return self._library.token_to_id(token)

    def side_files(self) -> dict[str, str]:
        return {LIBRARY_FILE: self._library.to_str()}
