"""Tiny backbones and a few-step Lightning fit for task tests."""

from __future__ import annotations

import functools
import logging

import lightning as L
import pytest
import torch

from lmlab.models import ModelConfig, build_backbone

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64}


def tiny_backbone(family: str, vocab_size: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(family=family, vocab_size=vocab_size, **{**TINY, **overrides}))


def adamw(lr: float = 3e-3):
    return functools.partial(torch.optim.AdamW, lr=lr)


def fit(task: L.LightningModule, dm: L.LightningDataModule, steps: int = 4, val_batches: int = 2,
        test: bool = True) -> dict[str, float]:
    """Train a few steps, validate, test; the metrics Lightning collected, as floats."""
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, val_check_interval=steps,
        check_val_every_n_epoch=None, limit_val_batches=val_batches, limit_test_batches=val_batches,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    trainer.fit(task, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if test:
        trainer.test(task, datamodule=dm, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics


@pytest.fixture(autouse=True)
def _quiet_single_threaded():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine the threads'
    synchronisation makes each matmul many times slower."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
