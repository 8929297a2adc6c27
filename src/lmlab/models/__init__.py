"""Backbone zoo: one `ModelConfig` describes every architecture; `build_backbone` builds it."""

from lmlab.models.builder import FAMILY_CLASSES, build_backbone
from lmlab.models.cache import KVCache
from lmlab.models.config import ModelConfig
from lmlab.models.decoder import DecoderBlock, DecoderLM
from lmlab.models.generation import generate

__all__ = [
    "FAMILY_CLASSES",
    "DecoderBlock",
    "DecoderLM",
    "KVCache",
    "ModelConfig",
    "build_backbone",
    "generate",
]
