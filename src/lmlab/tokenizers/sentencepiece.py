"""SentencePieceTokenizer: a SentencePiece `.model`, trained here or given as `tokenizer.path`.

Trained (no `path`): `model_type` unigram or bpe on the training text's lines, with lmlab's
specials at ids 0..5 (<pad> <bos> <eos> <unk> as SentencePiece's own, the others as control
symbols that text never produces), `byte_fallback` so unseen characters become UTF-8 byte pieces,
no whitespace collapsing, and "▁" prepended to each text (SentencePiece's dummy prefix). With
`normalization: none` and byte fallback, decode(encode(text)) == text for any text.

Given (`path`): the file is used as it is; unless its pieces 0..5 are lmlab's specials, its ids
are shifted up past them (`id_offset`), like an hf tokenizer.json.

Encoding for training samples segmentations with SentencePiece's own sampler: `dropout` is the
BPE-dropout rate of a bpe model, `alpha` the smoothing of a unigram model's lattice sampling.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers.base import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    TextStream,
    Tokenizer,
)
from lmlab.tokenizers.chunking import (
    Continuation,
    batches,
    continued_pieces,
    find_continuation,
)
from lmlab.tokenizers.config import TokenizerConfig

MODEL_FILE = "sentencepiece.model.b64"  # base64 of the .model file: saved tokenizers are text
_REQUIRED_CHARS = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")
# Lines longer than this are skipped by the trainer; long paragraphs are common in corpora.
_MAX_LINE_BYTES = 1 << 16


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, config: TokenizerConfig, model: bytes):
        super().__init__(config)
        self._model = model
        self._sp = _processor(model, "<sentencepiece model>")
        n = self.num_special_tokens
        native = tuple(self._sp.id_to_piece(list(range(min(n, self._sp.get_piece_size())))))
        self.id_offset = 0 if native == self.specials else n
        self._continuation: Continuation | None | bool = False  # False: not probed yet

    def __getstate__(self) -> dict[str, Any]:
        # The processor is a C++ object; workers rebuild it from the model bytes.
        return {**super().__getstate__(), "_sp": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sp = _processor(self._model, "<sentencepiece model>")

    @classmethod
    def needs_training_text(cls, config: TokenizerConfig) -> bool:
        return not config.uses_file

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> SentencePieceTokenizer:
        if config.uses_file:
            path = Path(config.path).expanduser()
            if not path.is_file():
                raise DataError(path, "no such SentencePiece model file")
            model = path.read_bytes()
            _processor(model, path)  # a corrupt file fails here, naming it
            return cls(config, model)
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts),
                model_writer=buffer,
                **_trainer_options(config),
            )
        except RuntimeError as exc:
            match = _REQUIRED_CHARS.search(str(exc))
            if match is None:
                raise
            raise ConfigError(
                "tokenizer.vocab_size",
                config.vocab_size,
                f"an integer >= {match.group(2)}",
                f"the training text needs {match.group(2)} pieces for its characters and "
                "the special tokens (byte pieces included); or lower character_coverage",
            ) from exc
        return cls(config, buffer.getvalue())

    @classmethod
    def from_saved(
        cls, config: TokenizerConfig, record: dict[str, Any], files: dict[str, str], source: Path
    ) -> SentencePieceTokenizer:
        if MODEL_FILE not in files:
            raise DataError(source, f"a sentencepiece tokenizer needs {MODEL_FILE}")
        try:
            model = base64.b64decode(files[MODEL_FILE], validate=True)
        except ValueError as exc:
            raise DataError(source.parent / MODEL_FILE, f"not base64 ({exc})") from exc
        _processor(model, source.parent / MODEL_FILE)
        tokenizer = cls(config, model)
        if tokenizer.vocab != record["vocab"]:
            raise DataError(source, f"vocabulary in the record disagrees with {MODEL_FILE}")
        return tokenizer

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The wrapped SentencePieceProcessor (its ids are lmlab's minus `id_offset`)."""
        return self._sp

    @property
    def model_bytes(self) -> bytes:
        """The `.model` file's content, e.g. to write it out for other tools."""
        return self._model

    @property
    def unknown_ids(self) -> frozenset[int]:
        return frozenset({*super().unknown_ids, self._sp.unk_id() + self.id_offset})

    @property
    def vocab_size(self) -> int:
        return self.id_offset + self._sp.get_piece_size()

    @property
    def vocab(self) -> list[str]:
        pieces = self._sp.id_to_piece(list(range(self._sp.get_piece_size())))
        return [*self.specials, *pieces] if self.id_offset else pieces

    # --- encoding ---------------------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._shift(self._sp.encode(texts, num_threads=_threads()))

    def _sample_batch(self, texts: list[str]) -> list[list[int]]:
        alpha = self.config.dropout or self.config.alpha
        sampled = self._sp.encode(
            texts, enable_sampling=True, alpha=alpha, nbest_size=-1, num_threads=_threads()
        )
        return self._shift(sampled)

    def _shift(self, batch: list[list[int]]) -> list[list[int]]:
        if not self.id_offset:
            return batch
        return [(np.asarray(ids, dtype=np.int64) + self.id_offset).tolist() for ids in batch]

    @property
    def continuation(self) -> Continuation | None:
        """How `encode_to_array` encodes a cut piece (None: this model is never cut)."""
        if self._continuation is False:
            self._continuation = find_continuation(self._sp.encode)
        return self._continuation

    def encode_to_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        continuation = self.continuation
        drop = continuation.drop if continuation else 0
        # Arrays straight from the C++ side (no Python list of ids is ever built), joined and
        # cast to `dtype` in one pass.
        parts: list[np.ndarray] = []
        for first, batch in batches(continued_pieces(text, continuation)):
            arrays = self._sp.encode(batch, out_type="numpy", num_threads=_threads())
            parts += [ids[drop:] if i and drop else ids for i, ids in enumerate(arrays, first)]
        out = np.concatenate(parts, dtype=dtype, casting="unsafe")
        if self.id_offset:
            out += self.id_offset
        return out

    # --- decoding and lookups ---------------------------------------------------------------
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self._decode_around_specials(ids, skip_special_tokens, self._decode_plain)

    def _decode_plain(self, ids: np.ndarray) -> str:
        return self._sp.decode((ids - self.id_offset).tolist())

    def id_to_token(self, i: int) -> str | None:
        if not 0 <= i < self.vocab_size:
            return None
        return self.specials[i] if i < self.id_offset else self._sp.id_to_piece(i - self.id_offset)

    def token_to_id(self, token: str) -> int | None:
        if self.id_offset and token in self.specials:
            return self.specials.index(token)
        i = self._sp.piece_to_id(token)
        # piece_to_id answers the unknown id for any string it does not know.
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            return None
        return i + self.id_offset

    def side_files(self) -> dict[str, str]:
        return {MODEL_FILE: base64.b64encode(self._model).decode("ascii")}

    def _stochastok_vocabulary(self) -> tuple[list[str], np.ndarray, str | None]:
        sp, n = self._sp, self._sp.get_piece_size()
        normal = [
            not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
            for i in range(n)
        ]
        usable = np.array(([False] * self.id_offset) + normal, dtype=bool)
        usable[: self.num_special_tokens] = False
        return self.vocab, usable, None


def _trainer_options(config: TokenizerConfig) -> dict[str, Any]:
    rule = "identity" if config.effective_normalization == "none" else "nfkc"
    if config.lowercase:
        rule = "nfkc_cf"
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        # A soft limit: a corpus too small for vocab_size gets the vocabulary it can fill
        # rather than an error, as the tokenizers-library trainers do.
        "hard_vocab_limit": False,
        "character_coverage": config.character_coverage,
        "byte_fallback": config.byte_fallback,
        "normalization_rule_name": rule,
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        "split_digits": config.digits == "split",
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "unk_id": UNK_ID,
        "pad_piece": SPECIAL_TOKENS[PAD_ID],
        "bos_piece": SPECIAL_TOKENS[BOS_ID],
        "eos_piece": SPECIAL_TOKENS[EOS_ID],
        "unk_piece": SPECIAL_TOKENS[UNK_ID],
        "control_symbols": [*SPECIAL_TOKENS[4:], *config.special_tokens],
        "max_sentence_length": _MAX_LINE_BYTES,
        "num_threads": _threads(),
        "minloglevel": 2,
    }


def _lines(texts: TextStream):
    # The trainer reads sentences; a text is cut at newlines so no line hits the length limit.
    for text in texts():
        for line in text.splitlines():
            if line.strip():
                yield line


def _processor(model: bytes, source: Any) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=model)
    except (RuntimeError, TypeError) as exc:
        raise DataError(source, f"not a valid SentencePiece model ({exc})") from exc


def _threads() -> int:
    return os.cpu_count() or 1
