"""Tiny backbones for compression tests, single-threaded (see tests/tasks/conftest.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from lmlab.models import ModelConfig, build_backbone

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "vocab_size": 50}


def tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(autouse=True)
def _quiet_single_threaded():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
