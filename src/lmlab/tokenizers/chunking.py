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

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

CHUNK_CHARS = 1 << 16
# Pieces per library call: several per core keep every core busy to the end; a bounded group
# keeps the library's per-token objects (and the id lists) of one call small on a large corpus.
BATCH_PIECES = max(64, 8 * (os.cpu_count() or 1))
_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")

# Lines that probe whether a pipeline encodes cut pieces like the whole text (see
# find_continuation): words, numbers, punctuation, a leading space, several scripts.
PROBE = "First line, 12345 words.\nSecond: a  b\tc\n\nThird ﬁ Ａ 🙂\nहिन्दी 中文 ไทย\nend\n"


@dataclass(frozen=True)
class Continuation:
    """Encode a non-first piece as `prefix + piece` and drop its first `drop` ids."""

    prefix: str = ""
    drop: int = 0


def cut_points(text: str, size: int | None = None) -> list[int]:
    """Where the pieces after the first start: about every `size` (default CHUNK_CHARS)
    characters, only right after a newline between non-spaces.

    A text without such a newline for a long stretch stays in one longer piece (correct, just
    not parallel there).
    """
    size = size or CHUNK_CHARS
    cuts, start = [], 0
    while len(text) - start > size:
        match = _BOUNDARY.search(text, start + size)
        if match is None:
            break
        start = match.start()
        cuts.append(start)
    return cuts


def split_text(text: str, size: int | None = None) -> list[str]:
    """The text cut at `cut_points`; joined, the pieces are the text."""
    bounds = [0, *cut_points(text, size), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def continued_pieces(
    text: str, continuation: Continuation | None, size: int | None = None
) -> list[str]:
    """What to encode for `text`: its first piece, then each further piece after the
    continuation's prefix (`[text]` when the pipeline cannot be cut). The ids of all but the
    first string, less their first `continuation.drop`, concatenate to the text's ids.

    The prefix is sliced from the text itself where it precedes the cut (a "\n" always does),
    so no piece is copied twice.
    """
    if continuation is None:
        return [text]
    cuts = cut_points(text, size)
    prefix, ends = continuation.prefix, [*cuts, len(text)]
    strings = [text[: ends[0]]]
    for start, end in zip(cuts, ends[1:], strict=True):
        if text.startswith(prefix, start - len(prefix)):
            strings.append(text[start - len(prefix) : end])
        else:
            strings.append(prefix + text[start:end])
    return strings


def batches(strings: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(index of the first, strings) in groups of BATCH_PIECES, one parallel call each."""
    for start in range(0, len(strings), BATCH_PIECES):
        yield start, strings[start : start + BATCH_PIECES]


def find_continuation(
    encode: Callable[[str], Sequence[int]], candidates: Sequence[str] = ("", "\n")
) -> Continuation | None:
    """The first candidate prefix under which cut pieces encode exactly like the whole text.

    None if no candidate works: such a pipeline must encode each text whole.
    """
    whole = list(encode(PROBE))
    for prefix in candidates:
        continuation = Continuation(prefix, len(encode(prefix)) if prefix else 0)
        first, *rest = continued_pieces(PROBE, continuation, size=1)
        joined = list(encode(first))
        for string in rest:
            joined += list(encode(string))[continuation.drop :]
        if joined == whole:
            return continuation
    return None
