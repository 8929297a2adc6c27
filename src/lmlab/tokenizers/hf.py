"""HFTokenizer: a pretrained `tokenizers` pipeline read from a local tokenizer.json.

`tokenizer.path` is the file itself or a folder holding one (a saved Hugging Face model or
tokenizer). Nothing is downloaded and nothing is trained: the file's normaliser, pre-tokenizer,
model and decoder are used as they are. Its ids are shifted up past lmlab's special tokens
(`id_offset`) unless the file already has them at ids 0..5, as one exported from an lmlab run
does; its own special tokens (e.g. GPT-2's "<|endoftext|>") are ordinary ids to lmlab, and text
never turns into them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import DataError
from lmlab.tokenizers.base import TextStream
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.pipeline import LIBRARY_FILE, PipelineTokenizer, library_from_json


class HFTokenizer(PipelineTokenizer):
    kind = "hf"

    def __init__(self, config: TokenizerConfig, library: Any):
        super().__init__(config, library, allow_offset=True)

    @classmethod
    def needs_training_text(cls, config: TokenizerConfig) -> bool:
        return False

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> HFTokenizer:
        path = resolve_tokenizer_file(config.path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(path, f"unreadable tokenizer file ({exc})") from exc
        tokenizer = cls(config, library_from_json(text, path))
        try:
            tokenizer.vocab  # noqa: B018 - a file with gaps in its ids fails now, not mid-run
        except DataError as exc:
            raise DataError(path, exc.reason) from exc
        return tokenizer


def resolve_tokenizer_file(path: str | None) -> Path:
    """The tokenizer.json that `tokenizer.path` names (the file, or inside the folder)."""
    given = Path(str(path)).expanduser()
    if given.is_dir():
        candidate = given / LIBRARY_FILE
        if candidate.is_file():
            return candidate
        hint = (
            "; it holds a SentencePiece model: use tokenizer=sentencepiece "
            f"tokenizer.path={given / 'tokenizer.model'}"
            if (given / "tokenizer.model").is_file()
            else ""
        )
        raise DataError(given, f"no {LIBRARY_FILE} in this folder{hint}")
    if not given.is_file():
        raise DataError(given, "no such tokenizer file (hf tokenizers are read from local files)")
    return given
