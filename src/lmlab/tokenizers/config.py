"""TokenizerConfig: the typed, self-validating form of the `tokenizer` config group."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import ConfigError

TOKENIZER_KINDS: tuple[str, ...] = (
    "char",
    "byte",
    "word",
    "bpe",
    "bytelevel_bpe",
    "wordpiece",
    "unigram",
    "sentencepiece",
    "hf",
)

# Kinds whose vocabulary is learned up to `vocab_size`; char and byte have a fixed or data-given
# alphabet and ignore it, so a default vocab_size must never make them fail.
SIZED_KINDS: frozenset[str] = frozenset(
    {"word", "bpe", "bytelevel_bpe", "wordpiece", "unigram", "sentencepiece"}
)
NORMALIZATIONS: tuple[str, ...] = ("none", "nfc", "nfd", "nfkc", "nfkd")
DIGIT_MODES: tuple[str, ...] = ("keep", "split", "group_l2r", "group_r2l")
SENTENCEPIECE_MODEL_TYPES: tuple[str, ...] = ("unigram", "bpe")
# What `normalization: null` means per kind: NFKC where the vocabulary is learned on characters
# (fewer near-duplicate tokens), none where the point of the kind is to keep the text as it is.
DEFAULT_NORMALIZATION: dict[str, str] = {
    "bpe": "nfkc",
    "wordpiece": "nfkc",
    "unigram": "nfkc",
    "sentencepiece": "nfkc",
}
# Kinds whose segmentation can be sampled at training time (BPE-dropout / Unigram sampling).
DROPOUT_KINDS = frozenset({"bpe", "bytelevel_bpe", "sentencepiece", "hf"})
ALPHA_KINDS = frozenset({"unigram", "sentencepiece", "hf"})
# StochasTok splits a token into two known tokens whose decoded text concatenates exactly; a
# single character/byte cannot be split and word tokens decode with spaces between them.
STOCHASTOK_KINDS = frozenset(
    {"bpe", "bytelevel_bpe", "wordpiece", "unigram", "sentencepiece", "hf"}
)
# A given file fixes its own pipeline, so options that would change it cannot apply.
FILE_KINDS = frozenset({"sentencepiece", "hf"})
BYTE_ALPHABET = 256

# Kept here rather than imported from base.py so that validating a config never needs the
# tokenizer implementations (and their libraries) to be importable.
NUM_SPECIAL_TOKENS = 6
_FIXED_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<sep>")


@dataclass
class TokenizerConfig:
    """How text becomes ids. Every field is a `tokenizer.<field>` override."""

    kind: str = "char"  # one of TOKENIZER_KINDS
    vocab_size: int = 1024  # upper bound incl. specials (sized kinds; char/byte/hf ignore it)
    min_frequency: int = 1  # a word/merge seen fewer times is not learned (word/bpe/wordpiece)
    lowercase: bool = False  # lowercase before tokenizing (byte keeps case unless asked)
    normalization: str | None = None  # none|nfc|nfd|nfkc|nfkd; null = the kind's default
    digits: str = "keep"  # keep | split (each digit) | group_l2r | group_r2l (threes)
    special_tokens: list[str] = field(default_factory=list)  # extra specials at ids 6, 7, ...
    dropout: float = 0.0  # BPE-dropout rate when encoding for training (bpe-type models)
    alpha: float | None = None  # Unigram sampling smoothing when encoding for training
    stochastok: float = 0.0  # StochasTok: share of tokens split in two when encoding for training
    path: str | None = None  # hf: tokenizer.json or its folder; sentencepiece: a .model to use
    model_type: str = "unigram"  # sentencepiece training: unigram | bpe
    byte_fallback: bool = True  # sentencepiece: unknown characters become UTF-8 byte pieces
    character_coverage: float = 0.9995  # sentencepiece: share of characters kept as pieces

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

    @property
    def effective_normalization(self) -> str:
        if self.normalization is not None:
            return self.normalization
        return DEFAULT_NORMALIZATION.get(self.kind, "none")

    @property
    def num_special_tokens(self) -> int:
        return NUM_SPECIAL_TOKENS + len(self.special_tokens)

    @property
    def uses_file(self) -> bool:
        """True when the tokenizer is read from `path` rather than trained."""
        return self.kind in FILE_KINDS and self.path is not None

    def validate(self) -> TokenizerConfig:
        """Raise ConfigError naming the first field that cannot work; return self for chaining.

        Alphabets that depend on the training text (bpe, wordpiece, unigram, sentencepiece) can
        only be checked against it, so those kinds check vocab_size again after training.
        """
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(
                "tokenizer.kind", self.kind, TOKENIZER_KINDS, "unknown tokenizer kind"
            )
        _require_int("tokenizer.vocab_size", self.vocab_size)
        _require_int("tokenizer.min_frequency", self.min_frequency)
        for name in ("lowercase", "byte_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"tokenizer.{name}", getattr(self, name), "true or false", "must be a boolean"
                )
        if self.min_frequency < 1:
            raise ConfigError("tokenizer.min_frequency", self.min_frequency, "an integer >= 1")
        _require_choice("tokenizer.normalization", self.normalization, (None, *NORMALIZATIONS))
        _require_choice("tokenizer.digits", self.digits, DIGIT_MODES)
        _require_choice("tokenizer.model_type", self.model_type, SENTENCEPIECE_MODEL_TYPES)
        self._validate_special_tokens()
        self._validate_rates()
        self._validate_vocab_size()
        self._validate_path()
        if self.kind == "sentencepiece" and not self.uses_file:
            self._validate_sentencepiece_training()
        return self

    def _validate_special_tokens(self) -> None:
        tokens = self.special_tokens
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise ConfigError(
                "tokenizer.special_tokens", tokens, "a list of non-empty strings", "bad type"
            )
        clash = [t for t in tokens if t in _FIXED_SPECIALS or tokens.count(t) > 1]
        if clash:
            raise ConfigError(
                "tokenizer.special_tokens",
                tokens,
                f"distinct strings other than {', '.join(_FIXED_SPECIALS)}",
                f"{clash[0]!r} is already a special token",
            )

    def _validate_rates(self) -> None:
        for name, low, high in (("dropout", 0.0, 1.0), ("stochastok", 0.0, 1.0)):
            value = _require_float(f"tokenizer.{name}", getattr(self, name))
            if not low <= value < high:
                raise ConfigError(f"tokenizer.{name}", value, f"a number in [{low}, {high})")
            setattr(self, name, value)
        if self.alpha is not None:
            self.alpha = _require_float("tokenizer.alpha", self.alpha)
            if not 0.0 < self.alpha <= 1.0:
                raise ConfigError("tokenizer.alpha", self.alpha, "null (off) or a number in (0, 1]")
        coverage = _require_float("tokenizer.character_coverage", self.character_coverage)
        if not 0.0 < coverage <= 1.0:
            raise ConfigError("tokenizer.character_coverage", coverage, "a number in (0, 1]")
        self.character_coverage = coverage
        for name, value, kinds in (
            ("dropout", self.dropout, DROPOUT_KINDS),
            ("alpha", self.alpha, ALPHA_KINDS),
            ("stochastok", self.stochastok, STOCHASTOK_KINDS),
        ):
            if value and self.kind not in kinds:
                raise ConfigError(
                    f"tokenizer.{name}",
                    value,
                    f"0 / null for kind={self.kind!r}, or a kind among {', '.join(sorted(kinds))}",
                    f"{self.kind} tokenizers cannot sample this",
                )
        if self.kind == "sentencepiece" and not self.uses_file:
            wrong = "alpha" if self.model_type == "bpe" else "dropout"
            if getattr(self, wrong):
                raise ConfigError(
                    f"tokenizer.{wrong}",
                    getattr(self, wrong),
                    "dropout for model_type=bpe, alpha for model_type=unigram",
                    f"sentencepiece model_type={self.model_type!r} samples the other way",
                )

    def _validate_vocab_size(self) -> None:
        if self.kind not in SIZED_KINDS or self.uses_file:
            return
        floor = self.num_special_tokens + 1
        what = f"the {self.num_special_tokens} special tokens"
        if self.kind == "bytelevel_bpe" or (self.kind == "sentencepiece" and self.byte_fallback):
            floor = self.num_special_tokens + BYTE_ALPHABET + (self.kind == "sentencepiece")
            what += f" and the {BYTE_ALPHABET} byte tokens"
        if self.vocab_size < floor:
            raise ConfigError(
                "tokenizer.vocab_size",
                self.vocab_size,
                f"an integer >= {floor}",
                f"must leave room for {what} (the base alphabet of {self.kind})",
            )

    def _validate_path(self) -> None:
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError("tokenizer.path", self.path, "a file or folder path", "bad type")
        if self.kind == "hf" and self.path is None:
            raise ConfigError(
                "tokenizer.path",
                None,
                "a local tokenizer.json, or a folder holding one (e.g. a saved HF model)",
                "the hf tokenizer is loaded from a file, never downloaded",
            )
        if self.path is not None and self.kind not in FILE_KINDS:
            raise ConfigError(
                "tokenizer.path",
                self.path,
                "null, or kind=hf / kind=sentencepiece",
                f"{self.kind} tokenizers are trained, not loaded from a file",
            )
        if self.uses_file:
            changed = {
                "lowercase": self.lowercase,
                "normalization": self.normalization,
                "digits": self.digits if self.digits != "keep" else None,
            }
            for name, value in changed.items():
                if value:
                    raise ConfigError(
                        f"tokenizer.{name}",
                        value,
                        "its default, or a trained kind",
                        f"a tokenizer loaded from {self.path} keeps the pipeline of that file",
                    )

    def _validate_sentencepiece_training(self) -> None:
        if self.digits in ("group_l2r", "group_r2l"):
            raise ConfigError(
                "tokenizer.digits",
                self.digits,
                "keep, split",
                "sentencepiece can split digits but not group them",
            )
        if self.effective_normalization not in ("none", "nfkc"):
            raise ConfigError(
                "tokenizer.normalization",
                self.normalization,
                "none, nfkc",
                "sentencepiece ships only these normalisation rules",
            )
        if self.lowercase and self.effective_normalization != "nfkc":
            raise ConfigError(
                "tokenizer.lowercase",
                self.lowercase,
                "false, or normalization=nfkc",
                "sentencepiece case-folds only as part of its NFKC rule",
            )


def _require_int(name: str, value: Any) -> None:
    # bool is an int subclass; `vocab_size=true` is a typo, not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "an integer", "must be an integer")


def _require_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, value, "a number", "must be a number")
    return float(value)


def _require_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        shown = ["null" if c is None else c for c in choices]
        raise ConfigError(name, value, shown, "unknown option")


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
