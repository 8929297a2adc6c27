"""model.compile: the training forward runs compiled with the eager numbers; evaluation stays
eager and the state dict (checkpoints) does not change."""

from __future__ import annotations

import pytest
import torch

from lmlab.tasks import CausalLMTask
from lmlab.tokenizers import build_tokenizer
from tests.tasks.conftest import adamw, tiny_backbone

pytestmark = pytest.mark.slow


def _task(compile_: bool) -> CausalLMTask:
    tokenizer = build_tokenizer({"kind": "byte"})
    backbone = tiny_backbone("decoder", tokenizer.vocab_size, compile=compile_, n_layers=1)
    return CausalLMTask(backbone, tokenizer, adamw())


def test_compiled_training_forward_matches_eager():
    eager, compiled = _task(False), _task(True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    ids = torch.randint(6, 200, (2, 16))
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
    for task in (eager, compiled):
        task.train()
    loss_eager, loss_compiled = eager._loss(batch), compiled._loss(batch)
    assert loss_compiled.item() == pytest.approx(loss_eager.item(), rel=1e-5)
    loss_compiled.backward(), loss_eager.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    compiled.eval()
    assert compiled._compiled_backbone is not None
    with torch.no_grad():  # evaluation takes the eager module (no compile for new shapes)
        torch.testing.assert_close(compiled(ids[:, :5]), eager(ids[:, :5]))
