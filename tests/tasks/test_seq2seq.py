"""Seq2seq: the loss ignores pads, BLEU/chrF/exact match are scored, a tiny transformer trains."""

from __future__ import annotations

import pytest
import torch

from lmlab import ConfigError
from lmlab.data import SyntheticTasksDataModule
from lmlab.tasks import Seq2SeqTask
from lmlab.tasks.text_metrics import corpus_scores
from tests.tasks.conftest import adamw, fit, tiny_backbone


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    dm = SyntheticTasksDataModule(tasks=["add_1", "reverse"], n_train=64, n_val=8, n_test=8, batch_size=8,
                                  eval_batch_size=8, format="seq2seq", tokenizer={"kind": "word"},
                                  cache_dir=tmp_path_factory.mktemp("cache"))
    dm.setup()
    return dm


def _task(dm, **kw):
    backbone = tiny_backbone("encoder_decoder", dm.tokenizer.vocab_size, position="sinusoidal")
    return Seq2SeqTask(backbone, dm.tokenizer, adamw(), **{**dm.task_kwargs(), **kw})


def test_perfect_predictions_score_100():
    refs = ["a man rides a horse .", "two dogs play in the snow", "3 4 5 6"]
    scores = corpus_scores(refs, refs)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert corpus_scores(["x y z"] * 3, refs)["bleu"] < 5


def test_loss_ignores_padding(synthetic):
    task = _task(synthetic, label_smoothing=0.0).eval()
    by_task = {e.task: enc for e, enc in zip(synthetic.splits["train"], synthetic.encoded["train"])}
    batch = synthetic.collate_train([by_task["reverse"], by_task["add_1"]])  # "add 1:" is one word longer
    src_pads = batch["src_mask"] == 0
    assert src_pads.any()
    # what sits under the pads must not matter: neither source pads nor target-side pads
    noisy = dict(batch)
    noisy["src_ids"] = batch["src_ids"].masked_fill(src_pads, 9)
    noisy["tgt_in"] = torch.cat([batch["tgt_in"], torch.full_like(batch["tgt_in"][:, :2], 9)], 1)
    noisy["tgt_out"] = torch.cat([batch["tgt_out"], torch.full_like(batch["tgt_out"][:, :2], -100)], 1)
    with torch.no_grad():
        torch.testing.assert_close(task._loss(batch, 0.0, "sum"), task._loss(noisy, 0.0, "sum"),
                                   rtol=1e-5, atol=1e-5)
        # and the mean is over real target tokens only
        n_real = (batch["tgt_out"] != -100).sum()
        torch.testing.assert_close(task._loss(noisy, 0.0, "mean") * n_real, task._loss(batch, 0.0, "sum"),
                                   rtol=1e-5, atol=1e-5)


def test_transformer_trains_and_reports_translation_metrics(synthetic):
    task = _task(synthetic, eval_max_batches_decoded=1)
    assert task.max_new_tokens == synthetic.task_kwargs()["max_new_tokens"]
    metrics = fit(task, synthetic, steps=4)
    for key in ("train/loss", "val/loss", "val/ppl", "val/bleu", "val/chrf", "val/acc",
                "test/bleu", "test/chrf", "test/acc", "test/acc/add_1", "test/acc/reverse"):
        assert key in metrics, key
    assert 0.0 <= metrics["test/bleu"] <= 100.0


def test_beam_search_and_config_errors(synthetic):
    task = _task(synthetic, num_beams=3)
    batch = next(iter(synthetic.val_dataloader()))
    assert len(task.decode_batch(batch)) == len(batch["target_text"])
    with pytest.raises(ConfigError, match="task.num_beams"):
        _task(synthetic, num_beams=0)
    with pytest.raises(ConfigError, match="task.label_smoothing"):
        _task(synthetic, label_smoothing=1.0)


def test_flops_count_the_output_layer_rows_the_fused_loss_multiplies(synthetic):
    # The fused loss uses lm_head.weight[:vocab]: the rows that pad the vocabulary are not
    # multiplied, so ThroughputMonitor does not count them; a LoRA-adapted head computes all.
    from lmlab.peft.lora import LoRA

    task = _task(synthetic)
    padded = task.backbone.lm_head.weight.shape[0]
    assert padded > synthetic.tokenizer.vocab_size
    assert task.flops_head_fraction == pytest.approx(synthetic.tokenizer.vocab_size / padded)
    adapted = LoRA(target_modules=["lm_head"]).apply(
        tiny_backbone("encoder_decoder", synthetic.tokenizer.vocab_size, position="sinusoidal"))
    task = Seq2SeqTask(adapted, synthetic.tokenizer, adamw(), **synthetic.task_kwargs())
    assert task.flops_head_fraction == 1.0
