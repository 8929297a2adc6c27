"""What every task shares: MoE auxiliary losses join the training loss, expert load is logged."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lmlab import ConfigError
from lmlab.data import SyntheticTasksDataModule
from lmlab.tasks import CausalLMTask
from tests.tasks.conftest import adamw, tiny_backbone


class MemoryLogger(Logger):
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class LossCheck(L.Callback):
    """Records the objective, the auxiliary terms and the loss returned to the optimizer."""

    def __init__(self):
        self.seen: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.seen.append((float(m["train/loss"]), float(m["train/moe/aux_loss"] + m["train/moe/z_loss"]),
                          float(outputs["loss"])))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    dm = SyntheticTasksDataModule(tasks=["add_1"], n_train=32, n_val=8, n_test=8, batch_size=8,
                                  tokenizer={"kind": "word"}, cache_dir=tmp_path_factory.mktemp("cache"))
    dm.setup()
    return dm


def test_moe_auxiliary_losses_are_added_and_expert_load_logged(pairs):
    backbone = tiny_backbone("decoder", pairs.tokenizer.vocab_size, ffn="moe", n_experts=4, top_k=2)
    task = CausalLMTask(backbone, pairs.tokenizer, adamw(), expert_load_every=2, **pairs.task_kwargs())
    logger, check = MemoryLogger(), LossCheck()
    trainer = L.Trainer(max_steps=4, logger=logger, callbacks=[check], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, accelerator="cpu")
    trainer.fit(task, datamodule=pairs)
    assert len(check.seen) == 4
    for objective, aux, total in check.seen:
        assert aux > 0
        assert total == pytest.approx(objective + aux, rel=1e-5)
    tables = [(step, row) for step, row in logger.rows if "train/expert_load/layer0/expert0" in row]
    assert [step for step, _ in tables] == [1, 3]  # with the loggers' reads (every n-th step)
    for _, row in tables:
        for layer in range(2):
            shares = [row[f"train/expert_load/layer{layer}/expert{e}"] for e in range(4)]
            assert sum(shares) == pytest.approx(1.0, abs=1e-4)
    assert any("train/expert_load_max" in row for _, row in logger.rows)


def test_dense_backbones_log_no_auxiliary_terms(pairs):
    task = CausalLMTask(tiny_backbone("decoder", pairs.tokenizer.vocab_size), pairs.tokenizer, adamw())
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, datamodule=pairs)
    assert not any(k.startswith(("train/moe", "train/expert_load", "train/total_loss"))
                   for k in trainer.callback_metrics)


def test_base_fields_are_validated(pairs):
    backbone = tiny_backbone("decoder", pairs.tokenizer.vocab_size)
    with pytest.raises(ConfigError, match="task.expert_load_every"):
        CausalLMTask(backbone, pairs.tokenizer, adamw(), expert_load_every=-1)
    with pytest.raises(ConfigError, match="task.weight_decay"):
        CausalLMTask(backbone, pairs.tokenizer, adamw(), weight_decay=-0.1)


def test_optimizer_covers_heads_and_skips_frozen_parameters(pairs):
    backbone = tiny_backbone("decoder", pairs.tokenizer.vocab_size)
    backbone.embed_tokens.requires_grad_(False)
    task = CausalLMTask(backbone, pairs.tokenizer, adamw())
    optimizer = task.configure_optimizers()
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in task.parameters() if p.requires_grad}
    assert torch.is_tensor(task.tokens_seen)


def test_fused_momentum_sgd_starts_with_zero_buffers(pairs):
    # torch's fused SGD would create them uninitialised in a first step that a GradScaler or
    # NonFiniteGuard may skip on the device (lmlab.optim.momentum).
    import functools

    backbone = tiny_backbone("decoder", pairs.tokenizer.vocab_size)
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, fused=True)
    task = CausalLMTask(backbone, pairs.tokenizer, sgd)
    optimizer = task.configure_optimizers()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert params and all(torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p))
                          for p in params)
