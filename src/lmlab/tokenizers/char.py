"""CharTokenizer: one id per character of the training text's alphabet; others become <unk>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import DataError
from lmlab.tokenizers.base import UNK_ID, TextStream, Tokenizer
from lmlab.tokenizers.config import TokenizerConfig

# Lone surrogates (text read with errors="surrogateescape") are still one code point each; pass
# them through rather than failing, they simply are unknown characters.
_CODEC = ("utf-32-le", "surrogatepass")
_TABLE_LIMIT = 1 << 16
_INT64 = np.dtype(np.int64)


class CharTokenizer(Tokenizer):
    """Characters sorted by code point get ids after the specials: deterministic for a text.

    Encoding and decoding work on arrays of code points (UTF-32), so a whole text is one
    `searchsorted`/gather rather than a Python loop over characters.
    """

    kind = "char"

    def __init__(self, config: TokenizerConfig, alphabet: str):
        super().__init__(config)
        self._codepoints = np.array(sorted({ord(c) for c in alphabet}), dtype=np.uint32)
        self._special_index = {tok: i for i, tok in enumerate(self.specials)}
        # Code point -> id as a direct table (one gather per character instead of a binary
        # search), with one extra entry for everything above the largest known code point.
        # Alphabets reaching past the Basic Multilingual Plane fall back to searchsorted.
        self._table: np.ndarray | None = None
        top = int(self._codepoints[-1]) if len(self._codepoints) else 0
        if top < _TABLE_LIMIT:
            table = np.full(top + 2, UNK_ID, dtype=np.int64)
            table[self._codepoints] = np.arange(len(self._codepoints)) + self.num_special_tokens
            self._table = table
        self._tables: dict[np.dtype, np.ndarray] = {}

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> CharTokenizer:
        alphabet: set[str] = set()
        probe = cls(config, "")
        for text in texts():
            alphabet.update(probe._prepare(text))
        return cls(config, "".join(alphabet))

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> CharTokenizer:
        vocab = record["vocab"]
        n = config.num_special_tokens
        chars = vocab[n:]
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise DataError(
                source, "char tokenizer vocabulary must be the specials then single characters"
            )
        tokenizer = cls(config, "".join(chars))
        if tokenizer.vocab != vocab:
            raise DataError(
                source, "char tokenizer vocabulary is not the specials then sorted characters"
            )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.num_special_tokens + len(self._codepoints)

    @property
    def vocab(self) -> list[str]:
        n = self.num_special_tokens
        return [*self.specials, *self._decode_plain(np.arange(n, self.vocab_size))]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One vectorised pass over the concatenation; len(str) counts code points, which is
        # exactly how the UTF-32 array is indexed, so the cut points are the running lengths.
        if not texts:
            return []
        texts = [self._prepare(t) for t in texts]
        ids = self._encode_array("".join(texts))
        cuts = np.cumsum([len(t) for t in texts])[:-1]
        return [part.tolist() for part in np.split(ids, cuts)]

    def encode_to_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        return self._encode_array(self._prepare(text), np.dtype(dtype)).astype(dtype, copy=False)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self._decode_around_specials(ids, skip_special_tokens, self._decode_plain)

    def id_to_token(self, i: int) -> str | None:
        n = self.num_special_tokens
        if 0 <= i < n:
            return self.specials[i]
        if n <= i < self.vocab_size:
            return chr(self._codepoints[i - n])
        return None

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_index:
            return self._special_index[token]
        if len(token) != 1:
            return None
        i = int(self._encode_array(token)[0])
        return None if i == UNK_ID else i

    def _prepare(self, text: str) -> str:
        if self.config.lowercase or self.config.effective_normalization != "none":
            return self._normalize_text(text)
        return text

    def _encode_array(self, text: str, dtype: np.dtype = _INT64) -> np.ndarray:
        points = np.frombuffer(text.encode(*_CODEC), dtype=np.uint32)
        if self._table is not None:
            # Gather straight into the caller's dtype (a token file is uint16): one pass.
            if dtype not in self._tables:
                self._tables[dtype] = self._table.astype(dtype)
            return self._tables[dtype][np.minimum(points, len(self._table) - 1)]
        if len(self._codepoints) == 0:
            return np.full(len(points), UNK_ID, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._codepoints, points), len(self._codepoints) - 1)
        known = self._codepoints[pos] == points
        return np.where(known, pos.astype(np.int64) + self.num_special_tokens, UNK_ID)

    def _decode_plain(self, ids: np.ndarray) -> str:
        return self._codepoints[ids - self.num_special_tokens].tobytes().decode(*_CODEC)
