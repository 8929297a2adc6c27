"""Backbone zoo: one `ModelConfig` describes every architecture; `build_backbone` builds it."""

from lmlab.models.builder import FAMILY_CLASSES, build_backbone
from lmlab.models.cache import KVCache
from lmlab.models.config import ModelConfig
from lmlab.models.decoder import DecoderBlock, DecoderLM
from lmlab.models.encoder import EncoderModel
from lmlab.models.encoder_decoder import EncoderDecoderModel, Seq2SeqCache
from lmlab.models.generation import generate
from lmlab.models.seq2seq_generation import generate_seq2seq

__all__ = [
    "FAMILY_CLASSES",
    "DecoderBlock",
    "DecoderLM",
    "EncoderDecoderModel",
    "EncoderModel",
    "KVCache",
    "ModelConfig",
    "Seq2SeqCache",
    "build_backbone",
    "generate",
    "generate_seq2seq",
]
