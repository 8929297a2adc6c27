"""Classification: pooling, the head trains under a frozen backbone, encoder and decoder runs."""

from __future__ import annotations

import pytest
import torch

from lmlab import ConfigError
from lmlab.data import ClassificationDataModule
from lmlab.tasks import ClassificationTask
from lmlab.tasks.classify import pool_hidden
from tests.conftest import SHARED_DATA
from tests.tasks.conftest import adamw, fit, tiny_backbone


def test_pooling_on_a_hand_made_batch():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(pool_hidden(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool_hidden(hidden, mask, "last"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    expected_mean = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])
    assert torch.allclose(pool_hidden(hidden, mask, "mean"), expected_mean)


@pytest.mark.parametrize("family,pooling", [("encoder", "cls"), ("encoder", "last"),
                                            ("encoder", "mean"), ("decoder", "last"),
                                            ("decoder", "mean")])
def test_the_backbone_computes_the_pooled_position_only(family, pooling):
    # cls and last pooling read one position a sequence: the backbone's last layer computes
    # only it after attention (output_rows), with the logits and gradients of pooling every
    # state.
    backbone = tiny_backbone(family, 60).double()
    task = ClassificationTask(backbone, None, adamw(), num_classes=3,
                              pooling=pooling, classifier_dropout=0.0).double()
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 7 + [0] * 2])
    states = backbone.hidden(ids, mask if family == "encoder" else None)
    reference = task.classifier(pool_hidden(states, mask, pooling))
    logits = task(ids, mask)
    torch.testing.assert_close(logits, reference.float(), rtol=1e-6, atol=1e-7)
    params = list(backbone.parameters())
    got = torch.autograd.grad(task(ids, mask).sum(), params, allow_unused=True)
    want = torch.autograd.grad(reference.sum(), params, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert bool(task.flops_row_modules) == (pooling != "mean")


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    dm = ClassificationDataModule(path=SHARED_DATA / "sst2", tokenizer={"kind": "word", "vocab_size": 2000},
                                  cache_dir=tmp_path_factory.mktemp("cache"), max_length=24, batch_size=16,
                                  eval_batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def sms(tmp_path_factory):
    dm = ClassificationDataModule(path=SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv", has_header=False,
                                  tokenizer={"kind": "word", "vocab_size": 2000}, max_length=32, batch_size=16,
                                  eval_batch_size=64, cache_dir=tmp_path_factory.mktemp("cache"))
    dm.setup()
    return dm


def test_sst2_folder_is_read_with_its_splits(sst2):
    assert {s: len(e) for s, e in sst2.encoded.items()} == {"train": 67349, "val": 872, "test": 1821}
    assert sst2.label_names == ["0", "1"] and sst2.task_kwargs() == {"num_classes": 2}
    assert sst2.max_sequence_length <= 24 and sst2.truncated["train"] > 0
    batch = next(iter(sst2.train_dataloader()))
    tok = sst2.tokenizer
    assert (batch["input_ids"][:, 0] == tok.bos_id).all()
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(16), last] == tok.eos_id).all()


def test_bert_classifies_sst2(sst2):
    backbone = tiny_backbone("encoder", sst2.tokenizer.vocab_size)
    task = ClassificationTask(backbone, sst2.tokenizer, adamw(), **sst2.task_kwargs())
    assert task.pooling == "cls"
    metrics = fit(task, sst2, steps=4)
    for key in ("train/loss", "val/loss", "val/acc", "val/f1", "test/acc", "test/f1"):
        assert key in metrics, key
    assert 0.0 <= metrics["test/f1"] <= 1.0


def test_decoder_classifies_with_last_token_pooling_and_a_frozen_backbone(sms):
    backbone = tiny_backbone("decoder", sms.tokenizer.vocab_size)
    backbone.requires_grad_(False)  # what peft=frozen does; the head must still train
    task = ClassificationTask(backbone, sms.tokenizer, adamw(1e-2), **sms.task_kwargs())
    assert task.pooling == "last"
    before_head = task.classifier.weight.detach().clone()
    before_body = next(backbone.parameters()).detach().clone()
    metrics = fit(task, sms, steps=4)
    assert not torch.equal(task.classifier.weight, before_head)
    assert torch.equal(next(backbone.parameters()), before_body)
    assert {"val/acc", "val/f1", "test/loss"} <= set(metrics)


def test_config_errors(sms):
    backbone = tiny_backbone("decoder", sms.tokenizer.vocab_size)
    with pytest.raises(ConfigError, match="task.num_classes"):
        ClassificationTask(backbone, sms.tokenizer, adamw())
    with pytest.raises(ConfigError, match="task.pooling"):
        ClassificationTask(backbone, sms.tokenizer, adamw(), num_classes=2, pooling="max")
