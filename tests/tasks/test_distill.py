"""Distillation: the KL term against a naive reference, the student's KL to a frozen teacher
falls (decoder and encoder-decoder), the teacher stays bit-identical and out of the student's
checkpoint, and every teacher mistake is a ConfigError."""

from __future__ import annotations

import pytest
import torch

from lmlab import ConfigError
from lmlab.data import SyntheticTasksDataModule
from lmlab.models import ModelConfig
from lmlab.tasks import DistillCausalLMTask, DistillSeq2SeqTask, distillation_task
from lmlab.tasks.distill import build_teacher, distillation_kl, load_teacher
from tests.conftest import write_lmlab_checkpoint
from tests.tasks.conftest import adamw, fit, tiny_backbone


def test_kl_matches_a_naive_sum():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 12), torch.randn(2, 5, 12) * 3
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, 2, -100, -100, -100]])
    T, V = 2.0, 10  # the last 2 ids only pad the vocabulary
    total, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t] == -100:
                continue
            p = torch.softmax(teacher[b, t, :V] / T, -1)
            q = torch.softmax(student[b, t, :V] / T, -1)
            total += float((p * (p.log() - q.log())).sum())
            n += 1
    assert float(distillation_kl(student, teacher, labels, T, V)) == pytest.approx(total / n, rel=1e-5)
    assert float(distillation_kl(teacher, teacher, labels, T, V)) == pytest.approx(0.0, abs=1e-6)


def _data(tmp_path_factory, fmt: str) -> SyntheticTasksDataModule:
    dm = SyntheticTasksDataModule(tasks=["add_1", "reverse"], n_train=64, n_val=8, n_test=8, batch_size=16,
                                  eval_batch_size=8, format=fmt, tokenizer={"kind": "word"},
                                  cache_dir=tmp_path_factory.mktemp("cache"))
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def clm_data(tmp_path_factory):
    return _data(tmp_path_factory, "clm")


@pytest.fixture(scope="module")
def seq2seq_data(tmp_path_factory):
    return _data(tmp_path_factory, "seq2seq")


def _batch_kl(task, dm) -> float:
    """The student's KL to the teacher on the first training batch (fixed: step 0)."""
    batch = next(iter(dm.train_dataloader()))
    task.eval()
    with torch.no_grad():
        if isinstance(task, DistillSeq2SeqTask):
            inputs, labels = (batch["src_ids"], batch["src_mask"], batch["tgt_in"]), batch["tgt_out"]
        else:
            inputs, labels = (batch["input_ids"],), batch["labels"]
        kl = distillation_kl(task(*inputs), task.teacher(*inputs), labels, task.temperature,
                             dm.tokenizer.vocab_size)
    return float(kl)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_student_moves_towards_a_frozen_teacher(family, clm_data, seq2seq_data):
    dm = clm_data if family == "decoder" else seq2seq_data
    vocab = dm.tokenizer.vocab_size
    extra = {"position": "sinusoidal"} if family == "encoder_decoder" else {}
    # A confident teacher (large init) and a smaller student of the same family.
    teacher = tiny_backbone(family, vocab, init_std=0.3, **extra)
    student = tiny_backbone(family, vocab, d_model=16, n_heads=2, **extra)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    kwargs = {"eval_generation": False}
    task = distillation_task(student, dm.tokenizer, adamw(1e-2), teacher=teacher, alpha=0.0, temperature=2.0,
                             **kwargs)
    assert isinstance(task, DistillSeq2SeqTask if family == "encoder_decoder" else DistillCausalLMTask)
    before = _batch_kl(task, dm)
    task.train()
    metrics = fit(task, dm, steps=12, val_batches=1, test=False)
    after = _batch_kl(task, dm)
    assert after < 0.8 * before, (before, after)
    assert {"train/ce", "train/kl", "train/loss"} <= set(metrics)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, frozen[key]), f"teacher weight {key} changed"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the teacher is no part of the student's task: not counted, not in its checkpoints
    assert not any(k.startswith("teacher") for k in task.state_dict())
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in student.parameters())


def test_alpha_one_is_plain_cross_entropy(clm_data):
    vocab = clm_data.tokenizer.vocab_size
    teacher = tiny_backbone("decoder", vocab, init_std=0.3)
    task = DistillCausalLMTask(tiny_backbone("decoder", vocab), clm_data.tokenizer, adamw(), teacher, alpha=1.0)
    batch = next(iter(clm_data.train_dataloader()))
    task.log = lambda *a, **k: None  # outside a Trainer
    with torch.no_grad():
        torch.testing.assert_close(task.training_step(batch, 0), task._loss(batch))


def test_teacher_mistakes_are_config_errors(tmp_path, clm_data, seq2seq_data):
    student = ModelConfig(family="decoder", vocab_size=clm_data.tokenizer.vocab_size)
    with pytest.raises(ConfigError) as info:
        load_teacher(None, student)
    assert info.value.field == "teacher"
    with pytest.raises(ConfigError) as info:
        load_teacher(str(tmp_path / "missing.ckpt"), student)
    assert info.value.field == "teacher"
    enc_dec = tiny_backbone("encoder_decoder", seq2seq_data.tokenizer.vocab_size)
    path = write_lmlab_checkpoint(tmp_path / "t5ish.ckpt", enc_dec, seq2seq_data.tokenizer)
    with pytest.raises(ConfigError, match="one family"):
        load_teacher(str(path), student)
    # a teacher whose tokenizer is not the run's
    other = SyntheticTasksDataModule(tasks=["sort_asc"], n_train=16, n_val=4, n_test=4, format="clm",
                                     tokenizer={"kind": "char"}, cache_dir=tmp_path / "c")
    other.setup()
    path = write_lmlab_checkpoint(tmp_path / "char.ckpt", tiny_backbone("decoder", other.tokenizer.vocab_size),
                                  other.tokenizer)
    with pytest.raises(ConfigError, match="tokenizer"):
        build_teacher(load_teacher(str(path), student), clm_data.tokenizer)
    with pytest.raises(ConfigError) as info:
        distillation_task(tiny_backbone("decoder", 50), clm_data.tokenizer, adamw(),
                          teacher=tiny_backbone("decoder", 50), alpha=1.5)
    assert info.value.field == "task.alpha"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_distill_run_with_a_teacher_checkpoint(make_cfg, family):
    from lmlab.checkpoint import load_init_source
    from lmlab.train import run

    extra = ["model=transformer", "task.eval_max_batches_decoded=1"] if family == "encoder_decoder" else []
    # the decoder teacher has another tokenizer kind than the student's config: the teacher's is used
    teacher_task = ["task=seq2seq"] if family == "encoder_decoder" else ["tokenizer=char"]
    teacher = run(make_cfg([*extra, *teacher_task], name="teacher"))
    overrides = ["task=distill", f"teacher={teacher['last_checkpoint']}", "model.d_model=16", "model.n_heads=2",
                 *extra]
    record = run(make_cfg(overrides, name="student"))
    assert record["status"] == "completed"
    if family == "decoder":  # resuming rebuilds the teacher and accepts its tokenizer
        resumed = run(make_cfg([*overrides, "trainer.max_steps=6"], name="student"))
        assert resumed["resumed_from"] and resumed["step"] == 6
    assert record["metrics"]["train/kl"] >= 0 and record["metrics"]["train/ce"] > 0
    # the student's checkpoint is the student alone: it loads as init_from
    student = load_init_source(record["last_checkpoint"])
    assert student.model_config["d_model"] == 16
    assert not any(k.startswith("teacher") for k in student.state_dict)
