"""A test-only callback: at the end of training every rank gathers the full weights it would
use (FSDP2 DTensors → full tensors, ZeRO-3 partitions → GatheredParameters) and saves them as
`<dirpath>/weights_rank<r>.pt`, so a test can check that all ranks hold the same model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # DeepSpeed ZeRO-3 partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: p.detach().clone().float() for k, p in params.items()}
    out = {}
    for name, p in params.items():  # every rank calls full_tensor() in the same order
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone().float()
    return out


class DumpRankWeights(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = gathered_state(pl_module)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.dirpath / f"weights_rank{trainer.global_rank}.pt")
