"""ByteTokenizer: UTF-8 bytes as ids 6..261. Lossless on any text, nothing to train."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import DataError
from lmlab.tokenizers.base import SPECIAL_TOKENS, TextStream, Tokenizer
from lmlab.tokenizers.config import NUM_SPECIAL_TOKENS, TokenizerConfig

_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")
_VOCAB = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256))]


class ByteTokenizer(Tokenizer):
    """Byte b is id b + 6; byte tokens are spelled `<0xHH>` (as in SentencePiece byte fallback)."""

    kind = "byte"

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> ByteTokenizer:
        return cls(config)

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> ByteTokenizer:
        if record["vocab"] != _VOCAB:
            raise DataError(source, "byte tokenizer vocabulary is not the 6 specials + 256 bytes")
        return cls(config)

    @property
    def vocab_size(self) -> int:
        return len(_VOCAB)

    @property
    def vocab(self) -> list[str]:
        return list(_VOCAB)

    def encode(self, text: str) -> list[int]:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return (raw.astype(np.int64) + NUM_SPECIAL_TOKENS).tolist()

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self._decode_around_specials(ids, skip_special_tokens, _decode_bytes)

    def id_to_token(self, i: int) -> str | None:
        return _VOCAB[i] if 0 <= i < len(_VOCAB) else None

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        match = _BYTE_TOKEN.fullmatch(token)
        return int(match.group(1), 16) + NUM_SPECIAL_TOKENS if match else None


def _decode_bytes(ids: np.ndarray) -> str:
    # A model can emit byte sequences that are not valid UTF-8; show them as U+FFFD rather than
    # failing a generation. Text that came from encode always decodes exactly.
    return (ids - NUM_SPECIAL_TOKENS).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
