"""build_tokenizer: train a tokenizer from config + text, or load it from the on-disk cache.

Cache layout: `<cache_dir>/tokenizers/<key[:16]>/` holds a saved tokenizer plus `cache.json`
(the full key and what went into it). The key covers the config, the training text and
CACHE_FORMAT_VERSION, so any change to one of them trains a new entry rather than reusing a
stale one. Entries appear by atomic rename, and training happens under a file lock on
`<entry>.lock`: concurrent jobs of a sweep wait for the first one instead of all training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from lmlab.errors import DataError
from lmlab.tokenizers.base import Tokenizer
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.fingerprint import TextSource, fingerprint_and_size, text_stream
from lmlab.tokenizers.registry import load_tokenizer, tokenizer_class

# Bump when training changes what a given config + text produces (a new pipeline step, a
# library upgrade that changes merges), so old cache entries are not reused.
CACHE_FORMAT_VERSION = 2
CACHE_SUBDIR = "tokenizers"
_CACHE_INFO = "cache.json"

log = logging.getLogger(__name__)


def build_tokenizer(
    config: TokenizerConfig | Mapping[str, Any],
    texts: TextSource | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """A tokenizer for `config`, trained on `texts` or loaded from `cache_dir` if built before.

    `texts` is a sequence of strings or a zero-argument callable returning an iterable of them
    (called once per pass). `byte`, `hf` and `sentencepiece` with a `path` need no text. The result's `from_cache` says whether it was
    loaded rather than trained. Raises ConfigError for a config that cannot work, DataError for
    missing or empty training text.
    """
    config = TokenizerConfig.from_dict(config)
    cls = tokenizer_class(config.kind)
    if not cls.needs_training_text(config):  # nothing is learned, so nothing to cache
        return cls.train(config, lambda: ())
    if texts is None:
        raise DataError(
            "<tokenizer training text>",
            f"no training text for the tokenizer (kind={config.kind!r} is trained)",
        )
    fingerprint, n_chars = fingerprint_and_size(texts)
    if n_chars == 0:
        raise DataError(
            "<tokenizer training text>", "no training text for the tokenizer: every text is empty"
        )
    stream = text_stream(texts)
    if cache_dir is None:
        return cls.train(config, stream)

    key = cache_key(config, fingerprint)
    entry = Path(cache_dir) / CACHE_SUBDIR / key[:16]
    cached = _load_entry(entry)
    if cached is not None:
        return cached
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        # Another process may have finished training while this one waited for the lock.
        cached = _load_entry(entry)
        if cached is not None:
            return cached
        if entry.exists():  # unreadable leftover (edited or from an older lmlab): replace it
            log.warning("tokenizer cache entry %s is unreadable; retraining it", entry)
            shutil.rmtree(entry)
        tokenizer = cls.train(config, stream)
        _write_entry(
            entry,
            tokenizer,
            {"key": key, "config": config.to_dict(), "text_fingerprint": fingerprint},
        )
    return tokenizer


def cache_key(config: TokenizerConfig, fingerprint: str) -> str:
    """sha256 of the canonical JSON of (config, text fingerprint, format version)."""
    payload = {"config": config.to_dict(), "text": fingerprint, "format": CACHE_FORMAT_VERSION}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _load_entry(entry: Path) -> Tokenizer | None:
    if not entry.is_dir():
        return None
    try:
        tokenizer = load_tokenizer(entry)
    except DataError:
        return None
    tokenizer.from_cache = True
    return tokenizer


def _write_entry(entry: Path, tokenizer: Tokenizer, info: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        tokenizer.save(tmp)
        (tmp / _CACHE_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
