"""Tiny-model factories shared by the model tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmlab.models import DecoderLM, ModelConfig

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


@pytest.fixture
def make_model():
    """make_model(**overrides) -> a seeded tiny DecoderLM in eval mode."""

    def _make(seed: int = 0, **overrides) -> DecoderLM:
        torch.manual_seed(seed)
        return DecoderLM(ModelConfig(**{**TINY, **overrides})).eval()

    return _make


@pytest.fixture
def with_impl():
    """with_impl(model, "eager") -> a copy of model using the other attention implementation."""

    def _copy(model: DecoderLM, attn_impl: str) -> DecoderLM:
        twin = DecoderLM(dataclasses.replace(model.config, attn_impl=attn_impl)).eval()
        twin.load_state_dict(model.state_dict())
        return twin

    return _copy


@pytest.fixture
def left_pad():
    """left_pad(prompts, pad_id=0) -> (ids, mask), prompts padded on the left to one width.

    A fixture rather than an importable helper: test modules importing `conftest` would pick
    up whichever directory's conftest.py pytest loaded last.
    """

    def _pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask

    return _pad
