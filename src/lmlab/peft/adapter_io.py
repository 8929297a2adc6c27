"""Adapter-only files: the tensors a PEFT run trained, saved apart from the frozen base.

`lmlab export <ckpt> OUT --adapter-only` writes

    OUT/adapter.safetensors   the trained tensors only (adapters, biases, heads...), as named in
                              the run's checkpoint (`backbone.layers.0.attn.q_proj.lora_A...`)
    OUT/adapter_config.json   the PEFT method and fields, the architecture, a fingerprint of the
                              frozen base the tensors were trained on, the base's `init_from`

and `peft_from=OUT` loads them back onto a base: the run builds its backbone as usual (from
`init_from`, or from the seed), applies the adapter's PEFT method, checks the base fingerprint,
then copies the tensors in. A file that does not fit its base is a ConfigError before compute,
never silently wrong outputs. For `none`/`full` the "adapter" is every weight.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.checkpoint import BACKBONE_PREFIX
from lmlab.errors import ConfigError
from lmlab.models.config import RUNTIME_FIELDS

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
# Architecture fields that may differ between the base and the adapter's run (shapes unchanged).
MAY_DIFFER = {*RUNTIME_FIELDS, "hf_id_offset"}


def trainable_keys(module: nn.Module) -> list[str]:
    """State-dict names of the parameters that train, tied aliases included."""
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad)


def base_fingerprint(state: dict[str, torch.Tensor], trained: set[str]) -> str:
    """sha256 of every backbone state tensor that did not train: the frozen base (and its
    buffers); heads and counters outside the backbone are left out by the callers."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if name in trained or not isinstance(state[name], torch.Tensor):
            continue
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Tied tensors (one storage under two names) are stored once; `aliases` names the rest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in by_storage:
            aliases[name] = by_storage[key]
            continue
        by_storage[key] = name
        stored[name] = tensor.contiguous().clone()
    save_file(stored, str(out / ADAPTER_FILE), metadata={"format": "pt", "lmlab": "adapter"})
    config = {**config, "aliases": aliases, "tensors": len(stored),
              "elements": sum(t.numel() for t in stored.values())}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out / ADAPTER_FILE


@dataclass
class AdapterSource:
    """An adapter directory read back: what `peft_from` loads onto a base."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def peft(self) -> dict[str, Any]:
        return dict(self.config["peft"])

    def peft_config(self, requested: dict[str, Any]) -> dict[str, Any]:
        """The adapter fixes the method and its fields (as init_from fixes the architecture);
        `peft=` may be left at `none` or name the same method."""
        method = requested.get("method", "none")
        if method not in ("none", self.peft["method"]):
            raise ConfigError(
                "peft", method, [self.peft["method"]],
                f"peft_from={self.path} holds peft={self.peft['method']} tensors; leave peft unset "
                "or use the same method (its fields come from the adapter)",
            )
        return self.peft

    def check_model(self, model: dict[str, Any]) -> None:
        saved = self.config.get("model", {})
        for key, value in saved.items():
            # vocab_size is known only once the tokenizer is; the base fingerprint covers it
            if key not in MAY_DIFFER and key != "vocab_size" and model.get(key) != value:
                raise ConfigError(
                    f"model.{key}", model.get(key), [value],
                    f"peft_from={self.path} was trained on a base with model.{key}={value!r}; load "
                    "it onto that base (init_from=<the base checkpoint>)",
                )

    def load_into(self, module: nn.Module) -> None:
        """Copy the tensors into a task module (names as in its state dict) whose backbone has
        had the adapter's PEFT method applied, after checking it is the base they belong to."""
        expected = set(trainable_keys(module))
        aliases = self.config.get("aliases", {})
        given = set(self.tensors) | set(aliases)
        state = module.state_dict()
        unknown = sorted(given - set(state))
        missing = sorted(expected - given)
        if unknown or missing:
            raise ConfigError(
                "peft_from", str(self.path),
                reason=f"the adapter does not fit this model (unknown tensors {unknown[:4]}, trained "
                f"tensors it lacks {missing[:4]})",
            )
        backbone_state = {k: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        fingerprint = base_fingerprint(backbone_state, given)
        if fingerprint != self.config.get("base_fingerprint"):
            base = self.config.get("base_init_from")
            hint = f"init_from={base}" if base else "the same init_from and seed as its run"
            raise ConfigError(
                "peft_from", str(self.path),
                reason=f"the frozen base differs from the one the adapter was trained on (base "
                f"fingerprint {fingerprint[:12]} != {str(self.config.get('base_fingerprint'))[:12]}); "
                f"load it onto its own base: {hint}",
            )
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                state[name].copy_(tensor)


def read_adapter(path: str | Path, field: str = "peft_from") -> AdapterSource:
    """`path` is an adapter directory or its adapter.safetensors."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights, config = directory / ADAPTER_FILE, directory / CONFIG_FILE
    for needed in (weights, config):
        if not needed.is_file():
            raise ConfigError(field, str(path), reason=f"no {needed.name} there (write one with "
                              "`lmlab export <run or checkpoint> <dir> --adapter-only`)")
    try:
        meta = json.loads(config.read_text())
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise ConfigError(field, str(path), reason=f"cannot be read ({err})") from None
    if "peft" not in meta or "base_fingerprint" not in meta:
        raise ConfigError(field, str(path), reason=f"{CONFIG_FILE} is not an lmlab adapter config")
    return AdapterSource(path=directory, config=meta, tensors=tensors)
