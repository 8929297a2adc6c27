"""Reading and writing a local Hugging Face model directory: config.json and the weights.

Only local files: nothing is downloaded and no code from the directory is ever run
(`trust_remote_code` is never set). Weights are read with `safetensors` (single file or
sharded with an index) or, for older checkpoints, `torch.load(weights_only=True)`, which
unpickles tensors and plain containers only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmlab.errors import ConfigError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILE = "tokenizer.json"

# Old checkpoints (e.g. the original BERT) name LayerNorm parameters after TF's gamma/beta.
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}


def model_directory(directory: str | Path, field: str = "init_from") -> Path:
    """The directory as a Path, or a ConfigError naming `field` when it is not a model dir."""
    path = Path(str(directory)).expanduser()
    if not path.is_dir():
        raise ConfigError(field, str(directory), "a local directory written by save_pretrained",
                          "no such directory (Hugging Face models are read from local "
                          "directories only; there is no hub access)")
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(field, str(directory), "a directory holding config.json and weights",
                          f"no {CONFIG_FILE} in this directory")
    return path


def read_config(directory: str | Path, field: str = "init_from") -> dict[str, Any]:
    """config.json as a plain dict (not through transformers, so no code is imported)."""
    path = model_directory(directory, field) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(field, str(directory), reason=f"unreadable {CONFIG_FILE} ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(field, str(directory), reason=f"{CONFIG_FILE} is not a JSON object")
    return config


def load_weights(directory: str | Path, field: str = "init_from") -> dict[str, Tensor]:
    """Every tensor of the checkpoint, by its Hugging Face name, on the CPU."""
    path = model_directory(directory, field)
    if (path / SAFETENSORS_FILE).is_file():
        state = _read_safetensors(path / SAFETENSORS_FILE)
    elif (path / SAFETENSORS_INDEX).is_file():
        state = {}
        for shard in _shards(path / SAFETENSORS_INDEX, field):
            state.update(_read_safetensors(path / shard))
    elif (path / TORCH_FILE).is_file():
        state = _read_torch(path / TORCH_FILE, field)
    elif (path / TORCH_INDEX).is_file():
        state = {}
        for shard in _shards(path / TORCH_INDEX, field):
            state.update(_read_torch(path / shard, field))
    else:
        raise ConfigError(field, str(directory),
                          f"{SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX}",
                          "no weights file in this directory")
    return {_modern_name(k): v for k, v in state.items()}


def tokenizer_path(directory: str | Path) -> Path | None:
    """The directory's tokenizer.json (what `tokenizer=hf tokenizer.path=<dir>` reads), or None."""
    candidate = Path(str(directory)).expanduser() / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _read_torch(path: Path, field: str) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, a truncated file, ...
        raise ConfigError(field, str(path), reason=f"cannot be read with weights_only=True ({err})") from None
    if not isinstance(state, dict):
        raise ConfigError(field, str(path), reason="not a state dict")
    return state


def _shards(index: Path, field: str) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ConfigError(field, str(index), reason=f"unreadable shard index ({err})") from None
    return sorted(set(weight_map.values()))


def _modern_name(name: str) -> str:
    for old, new in _LEGACY_SUFFIXES.items():
        if name.endswith(old) and "LayerNorm" in name:
            return name[: -len(old)] + new
    return name


def write_safetensors(state: dict[str, Tensor], directory: Path) -> Path:
    """Save tensors as one model.safetensors (contiguous copies; shared storage is not allowed)."""
    from safetensors.torch import save_file

    path = directory / SAFETENSORS_FILE
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})
    return path
