"""Export a trained run as a plain backbone: adapters merged, ready for `init_from` or inference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmlab.checkpoint import BACKBONE_PREFIX, METADATA_KEY, load_init_source, tokenizer_files
from lmlab.models import ModelConfig, build_backbone
from lmlab.peft import parameter_counts


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write `<out_dir>/model.ckpt` (merged weights + lmlab metadata, loadable with
    weights_only=True and usable as `init_from`), `config.json` and `tokenizer/`."""
    source = load_init_source(ckpt_path)
    config = ModelConfig.from_dict(source.model_config)
    backbone = source.load_into(build_backbone(config))  # merges adapters when there are any
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
