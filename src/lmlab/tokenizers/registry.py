"""Which class implements each tokenizer kind, and loading a saved tokenizer by its kind."""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers.base import Tokenizer
from lmlab.tokenizers.bpe import BPETokenizer
from lmlab.tokenizers.byte import ByteTokenizer
from lmlab.tokenizers.bytelevel_bpe import ByteLevelBPETokenizer
from lmlab.tokenizers.char import CharTokenizer
from lmlab.tokenizers.config import TOKENIZER_KINDS, TokenizerConfig
from lmlab.tokenizers.hf import HFTokenizer
from lmlab.tokenizers.sentencepiece import SentencePieceTokenizer
from lmlab.tokenizers.storage import RECORD_FILE, read_tokenizer_dir
from lmlab.tokenizers.unigram import UnigramTokenizer
from lmlab.tokenizers.word import WordTokenizer
from lmlab.tokenizers.wordpiece import WordPieceTokenizer

TOKENIZER_CLASSES: dict[str, type[Tokenizer]] = {
    cls.kind: cls
    for cls in (
        CharTokenizer,
        ByteTokenizer,
        WordTokenizer,
        BPETokenizer,
        ByteLevelBPETokenizer,
        WordPieceTokenizer,
        UnigramTokenizer,
        SentencePieceTokenizer,
        HFTokenizer,
    )
}
assert tuple(TOKENIZER_CLASSES) == TOKENIZER_KINDS, (
    "config.TOKENIZER_KINDS and the classes disagree"
)


def tokenizer_class(kind: str) -> type[Tokenizer]:
    if kind not in TOKENIZER_CLASSES:
        raise ConfigError("tokenizer.kind", kind, TOKENIZER_KINDS, "unknown tokenizer kind")
    return TOKENIZER_CLASSES[kind]


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load what `Tokenizer.save(directory)` wrote; DataError if missing, corrupt or mismatched."""
    record, files = read_tokenizer_dir(directory)
    source = Path(directory) / RECORD_FILE
    kind = record["kind"]
    if kind not in TOKENIZER_CLASSES:
        raise DataError(
            source,
            f"unknown tokenizer kind {kind!r} (this lmlab knows {', '.join(TOKENIZER_KINDS)})",
        )
    try:
        config = TokenizerConfig.from_dict(record["config"])
    except ConfigError as exc:
        raise DataError(source, f"saved tokenizer config is invalid: {exc}") from exc
    if config.kind != kind:
        raise DataError(
            source, f"record kind {kind!r} disagrees with its config kind {config.kind!r}"
        )
    tokenizer = TOKENIZER_CLASSES[kind].from_saved(config, record, files, source)
    if record.get("vocab_size") != tokenizer.vocab_size:
        raise DataError(
            source,
            f"vocab_size {record.get('vocab_size')} disagrees with the vocabulary "
            f"({tokenizer.vocab_size} tokens)",
        )
    return tokenizer
