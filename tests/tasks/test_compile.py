"""model.compile: the training forward runs compiled with the eager numbers; evaluation stays
eager and the state dict (checkpoints) does not change."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lmlab.data import TextCorpusDataModule
from lmlab.models.config import COMPILE_MODES
from lmlab.tasks import CausalLMTask
from lmlab.tokenizers import build_tokenizer
from tests.conftest import SHAKESPEARE
from tests.tasks.conftest import adamw, tiny_backbone


def _task(compile_: bool, **model) -> CausalLMTask:
    tokenizer = build_tokenizer({"kind": "byte"})
    backbone = tiny_backbone("decoder", tokenizer.vocab_size, compile=compile_, n_layers=1, **model)
    return CausalLMTask(backbone, tokenizer, adamw())


@pytest.mark.slow
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


# -- model.compile_mode -------------------------------------------------------------------------

class _Losses(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _train_losses(tmp_path, mode: str | None, steps: int = 6, accumulate: int = 2) -> list[float]:
    """Per-micro-batch training losses of a tiny clm fit; mode None = eager."""
    text = tmp_path / "a.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])
    dm = TextCorpusDataModule(path=text, seq_len=16, batch_size=4, max_eval_windows=4,
                              tokenizer={"kind": "char"})
    dm.setup()
    compiled = {} if mode is None else {"compile": True, "compile_mode": mode}
    task = CausalLMTask(tiny_backbone("decoder", dm.tokenizer.vocab_size, n_layers=1, **compiled),
                        dm.tokenizer, adamw(1e-2), eval_generation=False)
    losses = _Losses()
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[losses])
    trainer.fit(task, datamodule=dm)
    return losses.losses


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_modes_train_as_eager_does(tmp_path, mode):
    """Both kinds of mode (CUDA graphs, which torch skips on a CPU; autotuned kernels) train with
    gradient accumulation and reach the eager run's losses, step by step."""
    eager = _train_losses(tmp_path, None)
    compiled = _train_losses(tmp_path, mode)
    assert len(compiled) == len(eager) == 12
    assert all(math.isfinite(x) for x in compiled)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert sum(compiled[-4:]) < sum(compiled[:4])


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_the_mode_reaches_torch_compile(monkeypatch, mode):
    calls = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        calls.append(kwargs)
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    task = _task(True, compile_mode=mode)
    assert calls == [{"mode": mode}]
    assert task.cuda_graph_steps == (mode in ("reduce-overhead", "max-autotune"))
    assert not _task(False, compile_mode=mode).cuda_graph_steps  # nothing compiled, no graphs


def test_graphed_training_steps_are_marked_for_the_graph_trees(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    graphed, plain = _task(True, compile_mode="reduce-overhead"), _task(True)
    graphed.train(), plain.train()
    assert graphed.step_backbone() is graphed._compiled_backbone and len(marks) == 1
    assert plain.step_backbone() is plain._compiled_backbone and len(marks) == 1
    graphed.eval()  # evaluation is eager: no graphs, no mark
    assert graphed.step_backbone() is graphed.backbone and len(marks) == 1


def test_graphed_runs_accumulate_into_gradient_buffers_of_their_own():
    """Under CUDA graphs, `.grad` must never be the graphed backward's output (the next
    micro-batch's replay overwrites it): zero_grad allocates buffers once and zeroes them in
    place; other modes keep Lightning's set-to-None."""
    task = _task(True, compile_mode="reduce-overhead")
    optimizer = adamw()(task.parameters())
    task.optimizer_zero_grad(0, 0, optimizer)
    grads = [p.grad for p in task.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    for p in task.parameters():
        p.grad.add_(1.0)
    task.optimizer_zero_grad(0, 1, optimizer)
    assert all(p.grad is g and not g.any() for p, g in zip(task.parameters(), grads))

    plain = _task(True, compile_mode="max-autotune-no-cudagraphs")
    for p in plain.parameters():
        p.grad = torch.ones_like(p)
    plain.optimizer_zero_grad(0, 0, adamw()(plain.parameters()))
    assert all(p.grad is None for p in plain.parameters())


def test_compiled_backward_keeps_the_fp32_matmuls_of_emulated_bf16(monkeypatch):
    """Under CPU bf16-mixed with `Bf16MatmulsInFp32`, the compiled backward's products stay fp32
    as in eager autograd (torch traces it under the forward's autocast by default, which made
    them emulated bf16 products, 14x slower), and the gradients are eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from lmlab.precision import Bf16MatmulsInFp32

    backward_graphs = []

    def keep_forward(gm, example_inputs):
        return make_boxed_func(gm)

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=keep_forward, bw_compiler=keep_backward)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, mode=None: real_compile(model, backend=backend))
    torch._dynamo.reset()
    eager, compiled = _task(False), _task(True)
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(6, 200, (2, 16))
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
    for task in (eager, compiled):
        task.train()
        with torch.autocast("cpu", dtype=torch.bfloat16), Bf16MatmulsInFp32():
            loss = task._loss(batch)
        loss.backward()
    assert backward_graphs
    mm_dtypes = [node.meta["val"].dtype for gm in backward_graphs for node in gm.graph.nodes
                 if node.target is torch.ops.aten.mm.default]
    assert mm_dtypes and set(mm_dtypes) == {torch.float32}
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_classification_trains_compiled(monkeypatch, family):
    """task=classify pools the backbone's `hidden`, not its forward: under model.compile that
    method is compiled too (on first use), with the eager numbers; evaluation stays eager."""
    from lmlab.tasks import ClassificationTask

    compiled_calls = []
    real_compile = torch.compile

    def recording_compile(target, **kwargs):
        compiled_calls.append(getattr(target, "__name__", type(target).__name__))
        return real_compile(target, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    tokenizer = build_tokenizer({"kind": "byte"})
    tasks = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        backbone = tiny_backbone(family, tokenizer.vocab_size, compile=compile_, n_layers=1)
        tasks.append(ClassificationTask(backbone, tokenizer, adamw(), num_classes=3, classifier_dropout=0.0).train())
    eager, compiled = tasks
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(6, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    out_eager, out_compiled = eager(ids, mask), compiled(ids, mask)
    assert compiled_calls == ["DecoderLM" if family == "decoder" else "EncoderModel", "hidden"]
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
    out_compiled.square().sum().backward(), out_eager.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), eager(ids, mask))
