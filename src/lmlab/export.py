"""Export a trained run: its backbone with adapters merged (for `init_from` or inference), or
only the tensors it trained (`--adapter-only`, loaded back with `peft_from`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint import (
    BACKBONE_PREFIX,
    METADATA_KEY,
    load_init_source,
    read_checkpoint,
    tokenizer_files,
)
from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.peft import build_peft_strategy, parameter_counts
from lmlab.peft.adapter_io import base_fingerprint, save_adapter, trainable_keys


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint (file, or a sharded folder), or a run directory: its checkpoints/last.ckpt."""
    path = Path(path)
    last = path / "checkpoints" / "last.ckpt"
    return last if path.is_dir() and last.exists() else path


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write `<out_dir>/model.ckpt` (merged weights + lmlab metadata, loadable with
    weights_only=True and usable as `init_from`), `config.json` and `tokenizer/`."""
    ckpt_path = resolve_checkpoint(ckpt_path)
    source = load_init_source(ckpt_path)
    config = ModelConfig.from_dict(source.model_config)
    try:
        backbone = source.load_into(build_backbone(config))  # merges adapters when there are any
    except ConfigError as err:
        if not build_peft_strategy(source.peft).can_merge:
            raise ConfigError(
                "export", str(ckpt_path), ["--adapter-only"],
                f"peft={source.peft.get('method')} cannot be merged into the backbone "
                f"({build_peft_strategy(source.peft).cannot_merge_reason}); export its trained "
                "tensors with `lmlab export <ckpt> <dir> --adapter-only` and load them with "
                "peft_from=<dir>",
            ) from err
        raise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {BACKBONE_PREFIX + k: v.detach().clone() for k, v in backbone.state_dict().items()},
        METADATA_KEY: {
            "model": config.to_dict(),
            "peft": {"method": "none"},
            "merged_from": source.peft,
            "tokenizer_files": tokenizer_files(source.tokenizer),
        },
    }
    tmp = out / f".model.ckpt.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, out / "model.ckpt")
    summary = {"model": config.to_dict(), "params": parameter_counts(backbone), "source": str(ckpt_path),
               "merged_from": source.peft}
    (out / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
    source.tokenizer.save(out / "tokenizer")
    return out / "model.ckpt"


def _trained_names(ckpt: dict[str, Any]) -> list[str]:
    """The checkpoint's record of what trained; older checkpoints: rebuild the backbone with its
    PEFT method and ask it, plus every task-head parameter outside the backbone."""
    meta = ckpt[METADATA_KEY]
    if "trainable" in meta:
        return list(meta["trainable"])
    backbone = build_backbone(ModelConfig.from_dict(meta["model"]))
    build_peft_strategy(meta.get("peft", {"method": "none"})).apply(backbone)
    heads = [k for k in ckpt["state_dict"] if not k.startswith(BACKBONE_PREFIX) and k != "tokens_seen"]
    return [BACKBONE_PREFIX + n for n in trainable_keys(backbone)] + heads


def _base_init_from(ckpt_path: Path) -> str | None:
    """The run's own `init_from` (its base), from the record next to its checkpoints."""
    record = ckpt_path.parent.parent / "metrics.json"
    try:
        return json.loads(record.read_text()).get("init_from")
    except (OSError, ValueError):
        return None


def export_adapter(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write `<out_dir>/adapter.safetensors` (only the trained tensors) and
    `adapter_config.json` (PEFT method, architecture, base fingerprint); see peft/adapter_io."""
    ckpt_path = resolve_checkpoint(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, "checkpoint")
    meta = ckpt[METADATA_KEY]
    state = ckpt["state_dict"]
    names = [n for n in _trained_names(ckpt) if n in state]
    tensors = {n: state[n] for n in names}
    backbone_state = {k: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    config = {
        "peft": meta.get("peft", {"method": "none"}),
        "model": meta["model"],
        "base_fingerprint": base_fingerprint(backbone_state, set(names)),
        "base_init_from": _base_init_from(ckpt_path),
        "source": str(ckpt_path),
    }
    path = save_adapter(out_dir, tensors, config)
    summary = json.loads((Path(out_dir) / "adapter_config.json").read_text())
    summary["bytes"] = path.stat().st_size
    summary["checkpoint_bytes"] = _size(ckpt_path)
    (Path(out_dir) / "adapter_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    return path
