"""Cutting a large text into pieces that encode, one by one, exactly like the whole text.

The libraries encode a batch of texts in parallel, so a corpus is encoded fastest as a batch of
~64 KB pieces. A cut must not change the tokens: every kind here splits words at whitespace, but
some pipelines also look at the whitespace itself (GPT-2's pre-tokenizer gives " \\n" at the end
of a text but " " + "\\n" before a letter). A single newline between two non-space characters is
a boundary for all of them, so pieces are cut right after such a newline.

Pipelines that mark the start of a text (a "▁" prepended by the normalizer or SentencePiece's
dummy prefix) would tokenize a piece's first word as if it started a text; `Continuation` says
how to encode such a piece so that the marker falls into tokens that are then dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CHUNK_CHARS = 1 << 16
_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")

# Lines that probe whether a pipeline encodes cut pieces like the whole text (see
# find_continuation): words, numbers, punctuation, a leading space, several scripts.
PROBE = "First line, 12345 words.\nSecond: a  b\tc\n\nThird ﬁ Ａ 🙂\nहिन्दी 中文 ไทย\nend\n"


@dataclass(frozen=True)
class Continuation:
    """Encode a non-first piece as `prefix + piece` and drop its first `drop` ids."""

    prefix: str = ""
    drop: int = 0


def split_text(text: str, size: int | None = None) -> list[str]:
    """Pieces of about `size` (default CHUNK_CHARS) characters, cut only right after a newline
    between non-spaces.

    A text without such a newline for a long stretch stays in one longer piece (correct, just
    not parallel there).
    """
    size = size or CHUNK_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        match = _BOUNDARY.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


def encode_pieces(
    pieces: Sequence[str],
    encode_batch: Callable[[list[str]], list[Sequence[int]]],
    continuation: Continuation,
) -> list[Sequence[int]]:
    """Encode the pieces of one text as a batch; concatenated, they are the text's ids."""
    if len(pieces) <= 1 or continuation.prefix == "":
        return encode_batch(list(pieces))
    batch = [pieces[0], *(continuation.prefix + p for p in pieces[1:])]
    encoded = encode_batch(batch)
    return [encoded[0], *(ids[continuation.drop :] for ids in encoded[1:])]


def find_continuation(
    encode: Callable[[str], Sequence[int]], candidates: Sequence[str] = ("", "\n")
) -> Continuation | None:
    """The first candidate prefix under which cut pieces encode exactly like the whole text.

    None if no candidate works: such a pipeline must encode each text whole.
    """
    whole = list(encode(PROBE))
    pieces = split_text(PROBE, size=1)
    for prefix in candidates:
        continuation = Continuation(prefix, len(encode(prefix)) if prefix else 0)
        batch = lambda texts: [encode(t) for t in texts]  # noqa: E731 - probe only, a few lines
        joined = [i for ids in encode_pieces(pieces, batch, continuation) for i in ids]
        if joined == whole:
            return continuation
    return None
