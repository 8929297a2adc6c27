"""Tokenizer metrics: how a tokenizer segments a set of texts.

All ratios come from additive counts (`TextCounts`), so the metrics of several text sets pooled
are the counts summed, not an average of ratios. Words are whitespace-separated (`str.split()`),
which is what "fertility" means in the tokenizer-fairness literature; for scripts written without
spaces (Chinese, Japanese, Thai) a "word" is a whole phrase or sentence, so compare those by
tokens per character or by the premium over a parallel reference text instead.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmlab.tokenizers.base import Tokenizer

METRIC_NAMES: tuple[str, ...] = (
    "vocab_size",
    "fertility",
    "tokens_per_char",
    "bytes_per_token",
    "split_word_rate",
    "unk_rate",
    "vocab_utilisation",
    "encode_mb_per_s",
    "roundtrip_rate",
    "tokens",
)


_ADDITIVE = (
    "lines",
    "chars",
    "bytes",
    "words",
    "tokens",
    "unknown",
    "split_words",
    "exact_lines",
    "seconds",
)


@dataclass
class TextCounts:
    """What one tokenizer did on some texts; `+` pools two sets of texts."""

    vocab_size: int
    num_special_tokens: int
    lines: int = 0
    chars: int = 0
    bytes: int = 0
    words: int = 0
    tokens: int = 0
    unknown: int = 0
    split_words: int = 0
    exact_lines: int = 0
    seconds: float = 0.0
    used_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __add__(self, other: TextCounts) -> TextCounts:
        summed = {name: getattr(self, name) + getattr(other, name) for name in _ADDITIVE}
        return TextCounts(
            self.vocab_size,
            self.num_special_tokens,
            **summed,
            used_ids=np.union1d(self.used_ids, other.used_ids),
        )

    def metrics(self) -> dict[str, float]:
        """The ratios named in METRIC_NAMES (NaN where a denominator is zero)."""
        ordinary = self.vocab_size - self.num_special_tokens
        return {
            "vocab_size": float(self.vocab_size),
            "fertility": _ratio(self.tokens, self.words),
            "tokens_per_char": _ratio(self.tokens, self.chars),
            "bytes_per_token": _ratio(self.bytes, self.tokens),
            "split_word_rate": _ratio(self.split_words, self.words),
            "unk_rate": _ratio(self.unknown, self.tokens),
            "vocab_utilisation": _ratio(
                int(np.count_nonzero(self.used_ids >= self.num_special_tokens)), ordinary
            ),
            "encode_mb_per_s": _ratio(self.bytes / 1e6, self.seconds),
            "roundtrip_rate": _ratio(self.exact_lines, self.lines),
            "tokens": float(self.tokens),
        }


def count_text(tokenizer: Tokenizer, texts: Sequence[str]) -> TextCounts:
    """Encode `texts` (deterministically, as a batch) and count what the metrics need.

    A word is "split" when the word alone encodes to two or more tokens (each distinct word is
    encoded once, as its own text, and weighted by how often it occurs).
    """
    texts = list(texts)
    start = time.perf_counter()
    encoded = tokenizer.encode_batch(texts)
    seconds = time.perf_counter() - start
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded] or [np.empty(0)])
    flat = flat.astype(np.int64, copy=False)
    decoded = tokenizer.decode_batch(encoded)
    words = Counter(word for text in texts for word in text.split())
    distinct = list(words)
    pieces = tokenizer.encode_batch(distinct)
    split = sum(words[w] for w, ids in zip(distinct, pieces) if len(ids) >= 2)
    return TextCounts(
        vocab_size=tokenizer.vocab_size,
        num_special_tokens=tokenizer.num_special_tokens,
        lines=len(texts),
        chars=sum(len(t) for t in texts),
        bytes=sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts),
        words=sum(words.values()),
        tokens=int(flat.size),
        unknown=int(np.isin(flat, list(tokenizer.unknown_ids)).sum()),
        split_words=split,
        exact_lines=sum(a == b for a, b in zip(decoded, texts)),
        seconds=seconds,
        used_ids=np.unique(flat),
    )


def tokenizer_metrics(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """The metrics of METRIC_NAMES for `tokenizer` on `texts` (e.g. a run's validation lines).

    vocab_size, fertility (tokens per whitespace word), tokens_per_char, bytes_per_token (UTF-8),
    split_word_rate (share of word occurrences that take >= 2 tokens), unk_rate (share of
    tokens that are unknown), vocab_utilisation (share of the non-special vocabulary used),
    encode_mb_per_s (batch-encoding throughput, MB of UTF-8 per second), roundtrip_rate (share
    of texts with decode(encode(t)) == t exactly) and tokens (the count).
    """
    return count_text(tokenizer, texts).metrics()


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
