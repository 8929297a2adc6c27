"""CharTokenizer: one id per character of the training text's alphabet; others become <unk>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import DataError
from lmlab.tokenizers.base import SPECIAL_TOKENS, UNK_ID, TextStream, Tokenizer
from lmlab.tokenizers.config import NUM_SPECIAL_TOKENS, TokenizerConfig

# Lone surrogates (text read with errors="surrogateescape") are still one code point each; pass
# them through rather than failing, they simply are unknown characters.
_CODEC = ("utf-32-le", "surrogatepass")


class CharTokenizer(Tokenizer):
    """Characters sorted by code point get ids 6, 7, ...: deterministic for a given text.

    Encoding and decoding work on arrays of code points (UTF-32), so a whole text is one
    `searchsorted`/gather rather than a Python loop over characters.
    """

    kind = "char"

    def __init__(self, config: TokenizerConfig, alphabet: str):
        super().__init__(config)
        self._codepoints = np.array(sorted({ord(c) for c in alphabet}), dtype=np.uint32)
        self._special_index = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> CharTokenizer:
        alphabet: set[str] = set()
        for text in texts():
            alphabet.update(text)
        return cls(config, "".join(alphabet))

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> CharTokenizer:
        vocab = record["vocab"]
        chars = vocab[NUM_SPECIAL_TOKENS:]
        if tuple(vocab[:NUM_SPECIAL_TOKENS]) != SPECIAL_TOKENS or not all(
            isinstance(c, str) and len(c) == 1 for c in chars
        ):
            raise DataError(
                source, "char tokenizer vocabulary must be the 6 specials then single characters"
            )
        tokenizer = cls(config, "".join(chars))
        if tokenizer.vocab != vocab:
            raise DataError(source, "char tokenizer vocabulary is not sorted and duplicate-free")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL_TOKENS + len(self._codepoints)

    @property
    def vocab(self) -> list[str]:
        return [
            *SPECIAL_TOKENS,
            *self._decode_plain(np.arange(NUM_SPECIAL_TOKENS, self.vocab_size)),
        ]

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One vectorised pass over the concatenation; len(str) counts code points, which is
        # exactly how the UTF-32 array is indexed, so the cut points are the running lengths.
        if not texts:
            return []
        ids = self._encode_array("".join(texts))
        cuts = np.cumsum([len(t) for t in texts])[:-1]
        return [part.tolist() for part in np.split(ids, cuts)]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self._decode_around_specials(ids, skip_special_tokens, self._decode_plain)

    def id_to_token(self, i: int) -> str | None:
        if 0 <= i < NUM_SPECIAL_TOKENS:
            return SPECIAL_TOKENS[i]
        if NUM_SPECIAL_TOKENS <= i < self.vocab_size:
            return chr(self._codepoints[i - NUM_SPECIAL_TOKENS])
        return None

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_index:
            return self._special_index[token]
        if len(token) != 1:
            return None
        i = int(self._encode_array(token)[0])
        return None if i == UNK_ID else i

    def _encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode(*_CODEC), dtype=np.uint32)
        if len(self._codepoints) == 0:
            return np.full(len(points), UNK_ID, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._codepoints, points), len(self._codepoints) - 1)
        known = self._codepoints[pos] == points
        return np.where(known, pos.astype(np.int64) + NUM_SPECIAL_TOKENS, UNK_ID)

    def _decode_plain(self, ids: np.ndarray) -> str:
        return self._codepoints[ids - NUM_SPECIAL_TOKENS].tobytes().decode(*_CODEC)
