"""`build_backbone`: validate a `ModelConfig` and construct the module of its family."""

from __future__ import annotations

from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.backbone import check_buildable
from lmlab.models.config import FAMILIES, ModelConfig
from lmlab.models.decoder import DecoderLM
from lmlab.models.encoder import EncoderModel
from lmlab.models.encoder_decoder import EncoderDecoderModel

# New families (encoder, encoder-decoder, MoE, Mamba) register here and in config.FAMILIES.
FAMILY_CLASSES: dict[str, type[nn.Module]] = {
    "decoder": DecoderLM,
    "encoder": EncoderModel,
    "encoder_decoder": EncoderDecoderModel,
}


def build_backbone(config: ModelConfig) -> nn.Module:
    check_buildable(config)
    if config.hf_path:
        from lmlab.models.hf_backbone import HFBackbone  # transformers is imported only when needed

        return HFBackbone(config)
    if config.family not in FAMILY_CLASSES:
        raise ConfigError("model.family", config.family, FAMILIES, "no backbone class for it")
    return FAMILY_CLASSES[config.family](config)
