"""Loader settings every data module shares: batches are pinned only for a CUDA run."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lmlab.data import SyntheticTasksDataModule


def _with_device(dm, device: str):
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)),
                                 global_step=0, accumulate_grad_batches=1, global_rank=0,
                                 world_size=1)
    return dm


def test_pin_memory_only_when_training_on_cuda(cache_dir):
    dm = SyntheticTasksDataModule(tasks=["add_2"], n_train=20, n_val=4, n_test=4, batch_size=4,
                                  tokenizer={"kind": "word"}, cache_dir=cache_dir)
    dm.setup()
    assert not dm.pin_memory and not dm.train_dataloader().pin_memory  # no trainer yet
    assert not _with_device(dm, "cpu").train_dataloader().pin_memory
    cuda = _with_device(dm, "cuda")
    assert cuda.pin_memory and cuda.train_dataloader().pin_memory
    assert cuda.val_dataloader().pin_memory
