"""Placing a Hugging Face vocabulary's rows (embeddings, output layer) in lmlab's id space.

lmlab's `tokenizer=hf` reads a foreign tokenizer.json with its ids shifted up by `id_offset`
(lmlab's special tokens `<pad> <bos> <eos> <unk> <mask> <sep>` take ids 0..5), and every
lmlab backbone pads its vocabulary to a multiple of `pad_vocab_multiple`. So HF row i becomes
lmlab row i + id_offset; the special rows start as copies of the HF model's own special
tokens where it has them (`</s>` for `<eos>`, `[MASK]` for `<mask>`, ...) and as the mean row
otherwise; padding rows are zero (no tokenizer produces those ids).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lmlab.errors import ConfigError
from lmlab.models.hf.files import TOKENIZER_FILE

# lmlab's special tokens, in id order (lmlab.tokenizers.base.SPECIAL_TOKENS; repeated here so
# the model zoo does not import the tokenizers package).
LMLAB_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<sep>")

# For each lmlab special: the HF config ids, then the tokenizer's special-token names, that
# play the same part, in order of preference.
_SPECIAL_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "<pad>": (("pad_token_id",), ("pad_token",)),
    "<bos>": (("bos_token_id", "decoder_start_token_id"), ("bos_token", "cls_token")),
    "<eos>": (("eos_token_id",), ("eos_token", "sep_token")),
    "<unk>": ((), ("unk_token",)),
    "<mask>": ((), ("mask_token",)),
    "<sep>": (("sep_token_id",), ("sep_token", "eos_token")),
}


@dataclass
class VocabLayout:
    """Where the `hf_rows` rows of an HF vocabulary go in an lmlab embedding of `padded` rows."""

    hf_rows: int
    id_offset: int = 0
    vocab_size: int = 0  # lmlab's (tokenizer's) vocab size; 0 = hf_rows + id_offset
    pad_multiple: int = 64
    special_sources: dict[int, int] = field(default_factory=dict)  # lmlab id -> HF id

    def __post_init__(self) -> None:
        if not self.vocab_size:
            self.vocab_size = self.hf_rows + self.id_offset

    @property
    def padded(self) -> int:
        return math.ceil(self.vocab_size / self.pad_multiple) * self.pad_multiple

    def place(self, rows: Tensor) -> Tensor:
        """[hf_rows, ...] (embedding or output weight, or output bias) -> [padded, ...]."""
        out = rows.new_zeros((self.padded, *rows.shape[1:]))
        n = min(rows.shape[0], self.padded - self.id_offset)
        out[self.id_offset: self.id_offset + n] = rows[:n]
        if self.id_offset:
            mean = rows.float().mean(0).to(rows.dtype)
            for i in range(self.id_offset):
                source = self.special_sources.get(i)
                out[i] = rows[source] if source is not None and source < rows.shape[0] else mean
        return out

    def extract(self, rows: Tensor) -> Tensor:
        """The inverse of `place` for export: lmlab rows [padded, ...] -> [vocab_size - offset, ...]."""
        return rows[self.id_offset: self.vocab_size]


def vocab_layout(directory: Path, hf_config: dict[str, Any], hf_rows: int, id_offset: int = 0,
                 vocab_size: int | None = None, pad_multiple: int = 64) -> VocabLayout:
    """Check that the tokenizer's ids fit the model's rows and map the special rows."""
    if id_offset < 0:
        raise ValueError(f"id_offset must be >= 0, got {id_offset}")
    if vocab_size is not None and vocab_size > hf_rows + id_offset:
        raise ConfigError("init_from", str(directory),
                          reason=f"its tokenizer has {vocab_size} ids (with lmlab's {id_offset} "
                                 f"specials) but the model only {hf_rows} embedding rows")
    sources = special_sources(directory, hf_config) if id_offset else {}
    return VocabLayout(hf_rows, id_offset, vocab_size or 0, pad_multiple, sources)


def special_sources(directory: Path, hf_config: dict[str, Any]) -> dict[int, int]:
    """lmlab special id -> the HF id of the token playing the same part, where there is one."""
    names = _special_token_names(directory)
    vocab = _token_ids(directory)
    found: dict[int, int] = {}
    for lmlab_id, special in enumerate(LMLAB_SPECIALS):
        config_keys, token_keys = _SPECIAL_SOURCES[special]
        candidates = [_first_id(hf_config.get(k)) for k in config_keys]
        candidates += [vocab.get(names[k]) for k in token_keys if names.get(k) is not None]
        hit = next((c for c in candidates if isinstance(c, int) and c >= 0), None)
        if hit is not None:
            found[lmlab_id] = hit
    return found


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):  # eos_token_id may be a list (several end tokens)
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _special_token_names(directory: Path) -> dict[str, str]:
    """{"eos_token": "</s>", ...} from tokenizer_config.json / special_tokens_map.json."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        for key, value in data.items():
            if isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                names.setdefault(key, value)
    return names


def _token_ids(directory: Path) -> dict[str, int]:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return {}
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception:  # an unreadable tokenizer only costs the nicer special-row init
        return {}
