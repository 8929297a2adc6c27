"""`ModelConfig`: the one serialisable description of every backbone architecture.

Every field is a knob a researcher may override from the command line
(`model.n_kv_heads=2 model.position=alibi`), so `validate()` checks each one and names the
field, the value and what would be valid before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmlab.errors import ConfigError, check_choice

FAMILIES = ("decoder",)
FFNS = ("relu", "gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
ATTN_IMPLS = ("sdpa", "eager")

# SwiGLU's hidden size is rounded up to this so its matmuls tile well on accelerators.
_SWIGLU_MULTIPLE = 64


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `model.d_model=true` is a typo, not a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    """Architecture of a backbone. `vocab_size` comes from the tokenizer, set before building."""

    family: str = "decoder"
    vocab_size: int = 0
    pad_vocab_multiple: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    ffn: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    attn_impl: str = "sdpa"
    init_std: float = 0.02

    # ---- resolved sizes -------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn == "swiglu":
            # 8/3 * d keeps SwiGLU's three matrices at the parameter count of a 4*d MLP.
            raw = int(8 * self.d_model / 3)
            return math.ceil(raw / _SWIGLU_MULTIPLE) * _SWIGLU_MULTIPLE
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return math.ceil(self.vocab_size / m) * m

    # ---- validation -----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `ConfigError` for the first field that cannot work.

        `vocab_size=0` passes (it means "not yet set from the tokenizer", so a run can validate
        its model config before training a tokenizer); `build_backbone` rejects it.
        """
        check_choice("model.family", self.family, FAMILIES)
        check_choice("model.ffn", self.ffn, FFNS)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.position", self.position, POSITIONS)
        check_choice("model.attn_impl", self.attn_impl, ATTN_IMPLS)

        if not _is_int(self.vocab_size) or self.vocab_size < 0:
            raise ConfigError("model.vocab_size", self.vocab_size, "an integer >= 0",
                              "must be the tokenizer's vocabulary size")
        for name in ("pad_vocab_multiple", "d_model", "n_layers", "n_heads", "max_seq_len"):
            self._check_positive_int(name)
        for name in ("n_kv_heads", "d_ff"):
            if getattr(self, name) is not None:
                self._check_positive_int(name)
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"model.{name}", value, "a number > 0", "must be positive")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}", getattr(self, name), [True, False],
                                  "must be a boolean")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", self.dropout, "a number in [0, 1)",
                              "is a probability of dropping, 1 would drop everything")

        if self.d_model % self.n_heads != 0:
            raise ConfigError("model.n_heads", self.n_heads, _divisors(self.d_model),
                              f"does not divide model.d_model={self.d_model}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError("model.n_kv_heads", self.n_kv_heads, _divisors(self.n_heads),
                              f"does not divide model.n_heads={self.n_heads} "
                              "(each key/value head serves a whole group of query heads)")
        if self.position == "rope" and self.head_dim % 2 != 0:
            even = [h for h in _divisors(self.d_model) if (self.d_model // h) % 2 == 0]
            raise ConfigError("model.n_heads", self.n_heads, even,
                              f"rope rotates pairs of dimensions, so head_dim = "
                              f"d_model/n_heads = {self.head_dim} must be even")

    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"model.{name}", value, "an integer > 0", "must be a positive int")

    # ---- (de)serialisation ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain dict or an OmegaConf node; an unknown key is a `ConfigError`."""
        d = _to_plain_dict(d)
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise ConfigError(f"model.{key}", d[key], known, "unknown model field")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _to_plain_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # omegaconf is a dependency, but the model zoo works without Hydra.
        return dict(d)
    if isinstance(d, DictConfig):
        return OmegaConf.to_container(d, resolve=True)  # type: ignore[return-value]
    return dict(d)
