"""On-disk form of a saved tokenizer: `lmlab_tokenizer.json` plus side files, written atomically.

The record names every side file with its sha256, so a directory whose files come from two
different saves (a crash between two renames, a hand copy) is detected at load time instead of
silently pairing one tokenizer's vocabulary with another's merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmlab.errors import DataError

RECORD_FILE = "lmlab_tokenizer.json"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format_version", "kind", "config", "vocab", "files")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_tokenizer_dir(
    directory: str | os.PathLike, record: dict[str, Any], files: Mapping[str, str]
) -> Path:
    """Write `files` and the record (which gets their checksums) into `directory`.

    A new directory appears all at once (built beside it, then renamed). An existing one (a run
    directory the caller owns) is updated file by file with atomic renames, the record last, so a
    reader sees either the old record or a complete new one.
    """
    directory = Path(directory)
    record = {
        **record,
        "format_version": FORMAT_VERSION,
        "files": {n: sha256_text(t) for n, t in files.items()},
    }
    contents = {**files, RECORD_FILE: json.dumps(record, ensure_ascii=False, indent=1)}
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        for name, text in contents.items():
            if name != RECORD_FILE:
                _write_file_atomically(directory / name, text)
        _write_file_atomically(directory / RECORD_FILE, contents[RECORD_FILE])
        return directory
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name, text in contents.items():
            (tmp / name).write_text(text, encoding="utf-8")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_tokenizer_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Return (record, side files) of a saved tokenizer, or raise DataError saying what is wrong."""
    directory = Path(directory)
    path = directory / RECORD_FILE
    if not directory.is_dir():
        raise DataError(directory, "no such tokenizer directory")
    if not path.is_file():
        raise DataError(path, f"missing: {directory} does not hold a saved lmlab tokenizer")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            path, f"corrupt tokenizer record ({exc}); delete the directory and rebuild"
        ) from exc
    if not isinstance(record, dict) or any(k not in record for k in _REQUIRED_KEYS):
        raise DataError(
            path, f"corrupt tokenizer record: needs the keys {', '.join(_REQUIRED_KEYS)}"
        )
    if record["format_version"] != FORMAT_VERSION:
        raise DataError(
            path,
            f"tokenizer format version {record['format_version']!r}; "
            f"this lmlab reads version {FORMAT_VERSION}",
        )
    if not isinstance(record["vocab"], list) or not isinstance(record["files"], dict):
        raise DataError(
            path, "corrupt tokenizer record: 'vocab' must be a list and 'files' a mapping"
        )
    files: dict[str, str] = {}
    for name, digest in record["files"].items():
        side = directory / name
        try:
            text = side.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(side, f"tokenizer side file unreadable ({exc})") from exc
        if sha256_text(text) != digest:
            raise DataError(
                side,
                f"does not match the checksum in {RECORD_FILE}: the save was interrupted or edited",
            )
        files[name] = text
    return record, files


def _write_file_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
