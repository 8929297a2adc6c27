"""Causal LM on text with extra evaluation lengths: perplexity at each length."""

from __future__ import annotations

from lmlab.data import TextCorpusDataModule
from lmlab.tasks import CausalLMTask
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
