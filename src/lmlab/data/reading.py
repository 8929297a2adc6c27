"""Reading raw text from local files, with errors that name the file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

from lmlab.errors import DataError

TEXT_SUFFIXES = (".txt", ".gz", ".text", ".md")


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            path, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})", line=line
        ) from None


def read_text_file(path: str | Path) -> str:
    """One file, plain or gzip-compressed, as text. Raises DataError if missing/empty/undecodable."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(path, f"not a readable gzip file ({err})") from None
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(path, "file is empty (no non-whitespace text)")
    return text


def list_text_files(path: str | Path) -> list[Path]:
    """A file is itself; a folder is every text file below it, sorted so runs are reproducible."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(path, f"folder holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    return files


def read_corpus(path: str | Path) -> str:
    """A file or folder of text files, concatenated in sorted order with newline separators."""
    return "\n".join(read_text_file(p) for p in list_text_files(path))


def read_lines(path: str | Path) -> list[str]:
    """The lines of a (possibly gzip) text file, without line ends; CRLF and a missing final
    newline are handled, so `len()` is the file's line count."""
    text = read_text_file(path)
    if text.endswith("\n"):
        text = text[:-1]
    return [line.removesuffix("\r") for line in text.split("\n")]
