"""Shared helpers of the per-architecture converters: checked weight lookup, the output layer
and errors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from lmlab.errors import ConfigError
from lmlab.models.config import ModelConfig
from lmlab.models.hf.vocab import VocabLayout


class HFWeights:
    """An HF state dict read by name; a missing tensor is a ConfigError naming the directory.

    `prefix` is the base-model prefix of the task model (`model.`, `transformer.`, `bert.`);
    checkpoints saved from the bare base model lack it, so names are tried without it too.
    """

    def __init__(self, state: dict[str, Tensor], directory: Path, architecture: str,
                 prefix: str = ""):
        self.state = state
        self.directory = directory
        self.architecture = architecture
        self.prefix = prefix

    def has(self, name: str) -> bool:
        return self._key(name) is not None

    def __call__(self, name: str) -> Tensor:
        key = self._key(name)
        if key is None:
            raise ConfigError("init_from", str(self.directory),
                              reason=f"the weights lack {name!r}, which a {self.architecture} "
                                     "checkpoint has")
        return self.state[key]

    def _key(self, name: str) -> str | None:
        if name in self.state:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix):] in self.state:
            return name[len(self.prefix):]
        return None


def import_lm_head(w: HFWeights, state: dict[str, Tensor], config: ModelConfig,
                   vocab: VocabLayout, name: str = "lm_head.weight") -> Tensor:
    """lmlab's `lm_head.weight`: the embedding when tied or when the checkpoint stores no
    output layer (`name`), else the checkpoint's own, its rows placed like the embedding's."""
    if config.tie_embeddings or not w.has(name):
        return state["embed_tokens.weight"]
    return vocab.place(w(name))


def unsupported(directory: Path, architecture: str, key: str, value: Any,
                valid: Iterable[Any] | str, why: str = "") -> ConfigError:
    """The error for an HF config value with no exact lmlab equivalent."""
    if not isinstance(valid, str):
        valid = ", ".join(repr(v) for v in valid)
    reason = f"{architecture} with {key}={value!r} has no exact lmlab equivalent (supported: {valid})"
    return ConfigError("init_from", str(directory), reason=reason + (f"; {why}" if why else ""))


def require(hf: dict[str, Any], directory: Path, architecture: str, key: str,
            allowed: Iterable[Any], default: Any = None, why: str = "") -> Any:
    """hf[key] (or `default`), which must be one of `allowed`."""
    allowed = list(allowed)
    value = hf.get(key, default)
    if value not in allowed:
        raise unsupported(directory, architecture, key, value, allowed, why)
    return value


def export_error(field: str, value: Any, valid: Iterable[Any] | str, target: str) -> ConfigError:
    return ConfigError(f"model.{field}", value, valid,
                       f"does not map onto a Hugging Face {target} checkpoint")
