"""Hugging Face interop: import checkpoints into lmlab backbones, export decoders back.

Local directories only (no hub); never `trust_remote_code`; weights via safetensors or
`torch.load(weights_only=True)`.
"""

from lmlab.models.hf.files import tokenizer_path
from lmlab.models.hf.interop import (
    EXPORT_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    architecture_of,
    export_architecture,
    export_hf,
    hf_model_config,
    import_hf,
)

__all__ = [
    "EXPORT_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "architecture_of",
    "export_architecture",
    "export_hf",
    "hf_model_config",
    "import_hf",
    "tokenizer_path",
]
