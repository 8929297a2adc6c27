"""TokenizerConfig: the typed, self-validating form of the `tokenizer` config group."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmlab.errors import ConfigError

TOKENIZER_KINDS: tuple[str, ...] = ("char", "byte", "word", "bpe")

# Kinds whose vocabulary is learned up to `vocab_size`; char and byte have a fixed or data-given
# alphabet and ignore it, so a default vocab_size must never make them fail.
SIZED_KINDS: frozenset[str] = frozenset({"word", "bpe"})

# Kept here rather than imported from base.py so that validating a config never needs the
# tokenizer implementations (and their libraries) to be importable.
NUM_SPECIAL_TOKENS = 6


@dataclass
class TokenizerConfig:
    """How text becomes ids. Every field is a `tokenizer.<field>` override."""

    kind: str = "char"  # char | byte | word | bpe
    vocab_size: int = 1024  # upper bound incl. the 6 special tokens (word/bpe; char/byte ignore it)
    min_frequency: int = 1  # a word/merge seen fewer times than this is not learned (word/bpe)
    lowercase: bool = False  # lowercase before tokenizing (word/bpe)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | TokenizerConfig) -> TokenizerConfig:
        """Build and validate a config from a plain mapping or an OmegaConf DictConfig."""
        if isinstance(mapping, cls):
            return mapping.validate()
        mapping = _to_plain_dict(mapping)
        valid = cls.field_names()
        for key in mapping:
            if key not in valid:
                raise ConfigError(f"tokenizer.{key}", mapping[key], valid, "unknown key")
        return cls(**mapping).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TokenizerConfig:
        """Raise ConfigError naming the first field that cannot work; return self for chaining.

        The bpe alphabet can only be checked against the training text, so build_tokenizer does
        that after training (see bpe.py).
        """
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(
                "tokenizer.kind", self.kind, TOKENIZER_KINDS, "unknown tokenizer kind"
            )
        _require_int("tokenizer.vocab_size", self.vocab_size)
        _require_int("tokenizer.min_frequency", self.min_frequency)
        if not isinstance(self.lowercase, bool):
            raise ConfigError(
                "tokenizer.lowercase", self.lowercase, "true or false", "must be a boolean"
            )
        if self.kind in SIZED_KINDS and self.vocab_size <= NUM_SPECIAL_TOKENS:
            raise ConfigError(
                "tokenizer.vocab_size",
                self.vocab_size,
                f"an integer > {NUM_SPECIAL_TOKENS}",
                f"must exceed the {NUM_SPECIAL_TOKENS} special tokens to leave room for any "
                f"learned {self.kind} token",
            )
        if self.min_frequency < 1:
            raise ConfigError("tokenizer.min_frequency", self.min_frequency, "an integer >= 1")
        return self


def _require_int(field: str, value: Any) -> None:
    # bool is an int subclass; `vocab_size=true` is a typo, not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, value, "an integer", "must be an integer")


def _to_plain_dict(mapping: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # plain-Python use without Hydra installed
        DictConfig = None  # noqa: N806
    if DictConfig is not None and isinstance(mapping, DictConfig):
        return OmegaConf.to_container(mapping, resolve=True)  # type: ignore[return-value]
    if not isinstance(mapping, Mapping):
        raise ConfigError(
            "tokenizer", mapping, "a mapping of tokenizer fields", "must be a mapping"
        )
    return dict(mapping)
