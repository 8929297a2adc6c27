"""Sharded checkpoints (directories) → one lmlab checkpoint.

`trainer=fsdp` saves a torch.distributed.checkpoint folder (each rank its shard, `.metadata`,
Lightning's `meta.pt` with the loops and lmlab's metadata); DeepSpeed saves a folder with
`latest` and `checkpoint/` (model states, each rank's ZeRO partition). Resuming reads the folder
as is. For `init_from`, `lmlab export` and anything else that wants one file, `consolidate`
gathers the full fp32 weights (DeepSpeed: its zero_to_fp32 via Lightning's
`convert_zero_checkpoint_to_fp32_state_dict` logic) into a plain dict of tensors and data
that `torch.load(weights_only=True)` reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

# What a consolidated checkpoint keeps of the training state besides the weights.
KEPT_KEYS = ("lmlab", "epoch", "global_step")


def sharded_kind(path: str | Path) -> str | None:
    """"fsdp" | "deepspeed" for a sharded checkpoint folder, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "checkpoint").is_dir():
        return "deepspeed"
    if (path / ".metadata").is_file():
        return "fsdp"
    return None


def is_complete(path: str | Path) -> bool:
    """A folder a resume can use: every file the format needs is there."""
    kind = sharded_kind(path)
    path = Path(path)
    if kind == "deepspeed":
        return (path / "latest").is_file() and _deepspeed_model_file(path) is not None
    return kind == "fsdp" and (path / "meta.pt").is_file()


def _deepspeed_model_file(path: Path) -> Path | None:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        candidate = path / "checkpoint" / name
        if candidate.is_file():
            return candidate
    return None


def _plain(checkpoint: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    out = {k: checkpoint[k] for k in KEPT_KEYS if k in checkpoint}
    out["state_dict"] = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                         for k, v in state_dict.items()}
    return out


def metadata(path: str | Path) -> dict[str, Any]:
    """lmlab metadata, epoch and step of a sharded checkpoint folder, without its weights."""
    path = Path(path)
    kind = sharded_kind(path)
    source = path / "meta.pt" if kind == "fsdp" else _deepspeed_model_file(path) if kind == "deepspeed" else None
    if source is None or not source.is_file():
        raise ValueError(f"{path} is not a sharded (FSDP2 or DeepSpeed) checkpoint folder")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    return {k: checkpoint[k] for k in KEPT_KEYS if k in checkpoint}


def consolidate(path: str | Path) -> dict[str, Any]:
    """Full fp32 weights + lmlab metadata of a sharded checkpoint folder (no process group needed)."""
    path = Path(path)
    kind = sharded_kind(path)
    if kind == "fsdp":
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(path)
        return _plain(checkpoint, checkpoint["state_dict"])
    if kind == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed reads its own optimizer partitions (its pickles, written by this run's ranks).
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path))
        client = torch.load(_deepspeed_model_file(path), map_location="cpu", weights_only=True)
        state_dict = {k.removeprefix("_forward_module."): v for k, v in state_dict.items()}
        return _plain(client, state_dict)
    raise ValueError(f"{path} is not a sharded (FSDP2 or DeepSpeed) checkpoint folder")


def consolidate_to_file(path: str | Path, output: str | Path) -> Path:
    """Write `consolidate(path)` as one file (atomically)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    os.close(fd)
    torch.save(consolidate(path), tmp)
    os.replace(tmp, output)
    return output
