"""Tokenize a corpus once into a memory-mapped token file, shared by every run that needs it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from lmlab.tokenizers import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_to_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The whole text in one call: the tokenizer cuts it only where ids stay unchanged and
    encodes the pieces with its library's parallel batch call."""
    return tokenizer.encode_to_array(text, token_dtype(tokenizer.vocab_size))


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Identifies a tokenizer by what it does: its saved files' content."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        h = hashlib.sha256()
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def cached_tokens(tokenizer: Tokenizer, text: str, text_key: str, cache_dir: Path | None) -> np.ndarray:
    """The token ids of `text` as a read-only memmap (or an in-memory array without a cache dir)."""
    if cache_dir is None:
        return encode_to_array(tokenizer, text)
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{text_key}".encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    path, meta = folder / f"{key}.bin", folder / f"{key}.json"
    with FileLock(str(folder / f"{key}.lock")):
        if not (path.exists() and meta.exists()):
            arr = encode_to_array(tokenizer, text)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            arr.tofile(tmp)
            os.replace(tmp, path)
            tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
            tmp_meta.write_text(json.dumps({"dtype": arr.dtype.str, "length": int(arr.size)}))
            os.replace(tmp_meta, meta)
    info = json.loads(meta.read_text())
    if info["length"] == 0:
        return np.empty(0, dtype=np.dtype(info["dtype"]))
    return np.memmap(path, dtype=np.dtype(info["dtype"]), mode="r", shape=(info["length"],))
