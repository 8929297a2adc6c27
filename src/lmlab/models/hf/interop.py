"""`import_hf` / `export_hf`: Hugging Face checkpoints <-> lmlab backbones.

    config, state = import_hf("path/to/llama")          # ModelConfig + state_dict
    backbone = build_backbone(config); backbone.load_state_dict(state)
    export_hf(backbone, config, "out/llama_hf")         # AutoModelForCausalLM.from_pretrained

The architecture is read from config.json (`architectures`, else `model_type`); each one's
converter (llama.py, gpt2.py, bert.py, t5.py) maps the config exactly or raises ConfigError
naming what does not map, rather than importing an approximation.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.config import ModelConfig
from lmlab.models.hf import bert, gpt2, llama, t5
from lmlab.models.hf.files import load_weights, model_directory, read_config, write_safetensors
from lmlab.models.hf.mapping import HFWeights, export_error
from lmlab.models.hf.vocab import VocabLayout, vocab_layout

_CONVERTERS: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (llama, gpt2, bert, t5)}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_CONVERTERS)
EXPORT_ARCHITECTURES: tuple[str, ...] = (llama.ARCHITECTURE, gpt2.ARCHITECTURE)
_BY_MODEL_TYPE = {m.MODEL_TYPE: m.ARCHITECTURE for m in _CONVERTERS.values()}
# The base-model prefix of each task model's parameter names.
_PREFIXES = {llama.ARCHITECTURE: "model.", gpt2.ARCHITECTURE: "transformer.",
             bert.ARCHITECTURE: "bert.", t5.ARCHITECTURE: ""}


def architecture_of(hf: dict[str, Any], directory: str | Path, field: str = "init_from") -> str:
    """The supported architecture config.json names, or a ConfigError listing the supported."""
    named = hf.get("architectures") or []
    for arch in named:
        if arch in _CONVERTERS:
            return arch
    if not named and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    found = ", ".join(named) if named else f"model_type={hf.get('model_type')!r}"
    raise ConfigError(field, str(directory), SUPPORTED_ARCHITECTURES,
                      f"unsupported Hugging Face architecture {found}")


def hf_model_config(directory: str | Path, field: str = "init_from") -> ModelConfig:
    """The lmlab ModelConfig of an HF directory (vocab_size = the HF model's), without weights."""
    path = model_directory(directory, field)
    hf = read_config(path, field)
    return _model_config(_CONVERTERS[architecture_of(hf, path, field)], hf, path, field)


def _model_config(converter: ModuleType, hf: dict[str, Any], path: Path, field: str) -> ModelConfig:
    try:
        return converter.model_config(hf, path)
    except KeyError as err:
        raise ConfigError(field, str(path), reason=f"config.json lacks {err}, which a "
                                                   f"{converter.ARCHITECTURE} config has") from None


def import_hf(
    directory: str | Path,
    id_offset: int = 0,
    vocab_size: int | None = None,
    pad_vocab_multiple: int = 64,
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An HF model directory -> (ModelConfig, state_dict for `build_backbone(config)`).

    id_offset: lmlab id = HF id + id_offset. 0 keeps the HF ids; with lmlab's `tokenizer=hf`
        pass its `id_offset` (6 for a foreign tokenizer.json), and the special rows 0..5 are
        initialised from the model's own special tokens (see vocab.py).
    vocab_size: the lmlab tokenizer's vocab size (default: the HF model's + id_offset); rows the
        tokenizer can never produce are dropped, ids it could produce beyond the model's rows
        are a ConfigError.
    """
    path = model_directory(directory)
    hf = read_config(path)
    arch = architecture_of(hf, path)
    converter = _CONVERTERS[arch]
    config = _model_config(converter, hf, path, "init_from")
    config.pad_vocab_multiple = pad_vocab_multiple
    layout = vocab_layout(path, hf, config.vocab_size, id_offset, vocab_size, pad_vocab_multiple)
    config.vocab_size = layout.vocab_size
    config.validate()
    weights = HFWeights(load_weights(path), path, arch, _PREFIXES[arch])
    if converter is t5:
        state = t5.import_weights(weights, config, layout, hf)
    else:
        state = converter.import_weights(weights, config, layout)
    return config, state


def export_architecture(config: ModelConfig) -> str:
    """The HF architecture `config` maps onto exactly, or a ConfigError naming the field."""
    checks: list[tuple[str, Any, list[Any]]] = [
        ("family", config.family, ["decoder"]),
        ("norm_position", config.norm_position, ["pre"]),
        ("sliding_window", config.sliding_window, [None]),
        ("qk_norm", config.qk_norm, [False]),
        ("scale_embeddings", config.scale_embeddings, [False]),
    ]
    if config.layer_pattern is not None:
        checks.append(("layer_pattern", config.layer_pattern, [None]))
    checks.append(("mixer", config.mixer, ["attention"]))
    for field, value, valid in checks:
        if value not in valid:
            raise export_error(field, value, valid, "/".join(EXPORT_ARCHITECTURES))
    if config.position == "rope":
        llama.check_exportable(config)
        return llama.ARCHITECTURE
    if config.position == "learned":
        gpt2.check_exportable(config)
        return gpt2.ARCHITECTURE
    raise export_error("position", config.position,
                       [f"rope ({llama.ARCHITECTURE})", f"learned ({gpt2.ARCHITECTURE})"],
                       "/".join(EXPORT_ARCHITECTURES))


def export_hf(backbone: nn.Module, config: ModelConfig, directory: str | Path,
              id_offset: int = 0) -> Path:
    """Write config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained` loads.

    The HF vocabulary is lmlab's ids [id_offset, vocab_size): 0 keeps every lmlab id (use with
    the run's own tokenizer); an imported model's `id_offset` drops lmlab's special rows again
    so the original HF tokenizer fits. Adapters must be merged first (`strategy.merge`).
    """
    arch = export_architecture(config)
    converter = llama if arch == llama.ARCHITECTURE else gpt2
    state = dict(backbone.state_dict())
    injected = [k for k in state if "lora_" in k or "base_layer" in k]
    if injected:
        raise ValueError(f"merge the adapters before exporting (found {injected[0]!r})")
    layout = VocabLayout(config.vocab_size - id_offset, id_offset, config.vocab_size,
                         config.pad_vocab_multiple)
    out = Path(str(directory)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    converter.export_config(config, layout.hf_rows).save_pretrained(str(out))
    write_safetensors(converter.export_weights(state, config, layout), out)
    return out
