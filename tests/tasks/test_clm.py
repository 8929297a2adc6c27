"""Causal LM on text with extra evaluation lengths: perplexity at each length."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.data import TextCorpusDataModule
from lmlab.data.collate import IGNORE_INDEX
from lmlab.tasks import CausalLMTask
from lmlab.tasks.clm import causal_lm_loss
from lmlab.tokenizers import build_tokenizer
from tests.conftest import SHAKESPEARE
from tests.tasks.conftest import adamw, fit, tiny_backbone


def test_loss_and_perplexity_at_every_evaluation_length(tmp_path):
    (tmp_path / "a.txt").write_text(SHAKESPEARE.read_text()[:40000])
    dm = TextCorpusDataModule(path=tmp_path / "a.txt", seq_len=16, eval_seq_lens=[32, 64], batch_size=4,
                              max_eval_windows=8, tokenizer={"kind": "char"})
    dm.setup()
    task = CausalLMTask(tiny_backbone("decoder", dm.tokenizer.vocab_size, position="rope"), dm.tokenizer, adamw())
    metrics = fit(task, dm, steps=2)
    for stage in ("val", "test"):
        for suffix in ("", "@32", "@64"):
            assert metrics[f"{stage}/loss{suffix}"] > 0 and metrics[f"{stage}/ppl{suffix}"] > 1
    assert not any("dataloader_idx" in k for k in metrics)


def _reference_loss(logits, labels, label_smoothing=0.0, reduction="mean"):
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                             ignore_index=IGNORE_INDEX,
                                             label_smoothing=label_smoothing, reduction=reduction)


def test_loss_is_the_cross_entropy_of_the_logits_for_every_backbone_kind():
    """lmlab's decoder computes it (fused output layer + loss), any other backbone gives
    logits; both equal fp32 cross-entropy over the logits, in training and evaluation."""
    tokenizer = build_tokenizer({"kind": "byte"})
    backbone = tiny_backbone("decoder", tokenizer.vocab_size, position="rope")
    ids = torch.randint(6, 200, (2, 16))
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)), dim=1)
    batch = {"input_ids": ids, "labels": labels}

    class LogitsOnly(nn.Module):  # an HF backbone's contract: logits, no labels argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask)

    for model in (backbone, LogitsOnly(backbone)):
        task = CausalLMTask(model, tokenizer, adamw(), label_smoothing=0.1).train()
        assert causal_lm_loss(model, ids, labels).item() == pytest.approx(
            _reference_loss(backbone(ids), labels).item(), rel=1e-6)
        torch.testing.assert_close(task._loss(batch), _reference_loss(backbone(ids), labels, 0.1))
        with torch.no_grad():
            torch.testing.assert_close(task._loss(batch, reduction="sum"),
                                       _reference_loss(backbone(ids), labels, reduction="sum"))
