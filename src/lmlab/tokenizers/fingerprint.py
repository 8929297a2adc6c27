"""Training-text sources and their fingerprint: the text half of every tokenizer cache key."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from lmlab.errors import DataError

TextSource = Sequence[str] | Callable[[], Iterable[str]]
_SOURCE_NAME = "<tokenizer training text>"


def text_stream(texts: TextSource) -> Callable[[], Iterator[str]]:
    """A zero-argument callable giving a fresh pass over the texts, checking each is a str.

    A bare string is one text (iterating it would otherwise yield characters). A callable is
    called once per pass, so a corpus can be streamed from disk instead of held in memory.
    """
    if isinstance(texts, str):
        texts = [texts]
    source = texts if callable(texts) else (lambda: texts)

    def stream() -> Iterator[str]:
        for i, text in enumerate(source()):
            if not isinstance(text, str):
                raise DataError(_SOURCE_NAME, f"item {i} is a {type(text).__name__}, expected str")
            yield text

    return stream


def fingerprint_and_size(texts: TextSource) -> tuple[str, int]:
    """(sha256 hex of the text stream, total characters) in one pass.

    Each text is length-prefixed, so ["ab", "c"] and ["a", "bc"] differ: texts are separate
    training examples (BPE never merges across them).
    """
    digest = hashlib.sha256()
    n_chars = 0
    for text in text_stream(texts)():
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        n_chars += len(text)
    return digest.hexdigest(), n_chars


def text_fingerprint(texts: TextSource) -> str:
    """sha256 hex digest identifying the texts (their content and how they are split)."""
    return fingerprint_and_size(texts)[0]
