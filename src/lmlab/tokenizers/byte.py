"""ByteTokenizer: UTF-8 bytes as ids 6..261 (after any extra specials). Lossless, nothing to train."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import DataError
from lmlab.tokenizers.base import TextStream, Tokenizer
from lmlab.tokenizers.config import BYTE_ALPHABET, TokenizerConfig

_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")
_BYTE_NAMES = tuple(f"<0x{b:02X}>" for b in range(BYTE_ALPHABET))


class ByteTokenizer(Tokenizer):
    """Byte b is id b + 6; byte tokens are spelled `<0xHH>` (as in SentencePiece byte fallback).

    Lossless on any text unless the config asks for normalisation or lowercasing.
    """

    kind = "byte"

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> ByteTokenizer:
        return cls(config)

    @classmethod
    def needs_training_text(cls, config: TokenizerConfig) -> bool:
        return False

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> ByteTokenizer:
        tokenizer = cls(config)
        if record["vocab"] != tokenizer.vocab:
            raise DataError(source, "byte tokenizer vocabulary is not the specials + 256 bytes")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.num_special_tokens + BYTE_ALPHABET

    @property
    def vocab(self) -> list[str]:
        return [*self.specials, *_BYTE_NAMES]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_array(t).tolist() for t in texts]

    def encode_to_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        return self._encode_array(text, dtype)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self._decode_around_specials(ids, skip_special_tokens, self._decode_bytes)

    def id_to_token(self, i: int) -> str | None:
        return self.vocab[i] if 0 <= i < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials.index(token)
        match = _BYTE_TOKEN.fullmatch(token)
        return int(match.group(1), 16) + self.num_special_tokens if match else None

    def _encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        if self.config.lowercase or self.config.effective_normalization != "none":
            text = self._normalize_text(text)
        raw = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
        # Widened and shifted in one pass, straight into the caller's dtype.
        return np.add(raw, self.num_special_tokens, dtype=dtype)

    def _decode_bytes(self, ids: np.ndarray) -> str:
        # A model can emit byte sequences that are not valid UTF-8; show them as U+FFFD rather
        # than failing a generation. Text that came from encode always decodes exactly.
        raw = (ids - self.num_special_tokens).astype(np.uint8).tobytes()
        return raw.decode("utf-8", errors="replace")
