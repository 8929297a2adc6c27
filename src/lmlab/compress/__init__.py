"""Compression strategies (`compress=`): pruning and quantization, and their measurements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmlab.compress.base import Compression, NoCompression
from lmlab.compress.flow import check_compression, compress_after_training
from lmlab.compress.prune import Pruning
from lmlab.compress.quantize import Quantization
from lmlab.errors import ConfigError

METHODS: dict[str, type[Compression]] = {cls.method: cls for cls in (NoCompression, Pruning, Quantization)}


def build_compression(cfg: Mapping[str, Any] | None) -> Compression:
    cfg = dict(cfg or {"method": "none"})
    method = cfg.get("method", "none")
    if method not in METHODS:
        raise ConfigError("compress.method", method, sorted(METHODS), "unknown compression method")
    return METHODS[method].from_dict(cfg)


__all__ = ["METHODS", "Compression", "NoCompression", "Pruning", "Quantization", "build_compression",
           "check_compression", "compress_after_training"]
