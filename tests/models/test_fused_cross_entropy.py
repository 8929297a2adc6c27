"""The chunked output layer + cross-entropy equals `F.cross_entropy` over full fp32 logits:
loss and every gradient, with ignored labels, label smoothing, both reductions, bf16
autocast, torch.compile, tied embeddings, and adapted heads (which take the plain path)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models import ModelConfig, build_backbone
from lmlab.models.layers.fused_cross_entropy import (
    chunk_rows,
    fusable_head,
    head_cross_entropy,
    linear_cross_entropy,
)
from lmlab.peft import build_peft_strategy

IGNORE = -100


def _reference(hidden, weight, labels, label_smoothing=0.0, reduction="mean"):
    """Independent of the module: full logits, fp32 cross-entropy."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction=reduction)


def _inputs(n_rows=3 * 21, d=16, vocab=96, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(3, n_rows // 3, d, requires_grad=True)
    weight = (torch.randn(vocab, d) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (3, n_rows // 3))
    labels[0, :7] = IGNORE  # a prompt
    labels[2, -1] = IGNORE  # the last position predicts nothing
    return hidden, weight, labels


def _loss_and_grads(loss_fn, hidden, weight, upstream=1.7):
    loss = loss_fn()
    grads = torch.autograd.grad(loss * upstream, (hidden, weight))
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("rows", [16, 17, 64, 1000])  # chunks that do and don't divide N = 63
def test_loss_and_gradients_equal_the_full_logits_path(reduction, label_smoothing, rows):
    hidden, weight, labels = _inputs()
    fused, fused_grads = _loss_and_grads(lambda: linear_cross_entropy(
        hidden, weight, labels, IGNORE, label_smoothing, reduction, chunk_rows_=rows),
        hidden, weight)
    ref, ref_grads = _loss_and_grads(lambda: _reference(
        hidden, weight, labels, label_smoothing, reduction), hidden, weight)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_every_label_ignored_gives_what_cross_entropy_gives():
    hidden, weight, labels = _inputs()
    labels = torch.full_like(labels, IGNORE)
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, labels, IGNORE, reduction=reduction),
            _reference(hidden, weight, labels, reduction=reduction), equal_nan=True)
    loss = linear_cross_entropy(hidden, weight, labels, IGNORE, reduction="sum")
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert all(not g.any() for g in grads)


def test_no_grad_and_frozen_weight():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, labels, IGNORE, chunk_rows_=16)
    assert not value.requires_grad
    torch.testing.assert_close(value, _reference(hidden, weight, labels).detach())
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, labels, IGNORE, chunk_rows_=16)
    (got,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(_reference(hidden, frozen, labels), hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_the_autocast_reference():
    """Under autocast the matmuls run in bf16 as nn.Linear's would; softmax stays fp32 and the
    weight gradient accumulates in fp32, so only bf16 rounding separates the two."""
    hidden, weight, labels = _inputs(n_rows=3 * 40, d=32, vocab=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads = _loss_and_grads(lambda: linear_cross_entropy(
            hidden, weight, labels, IGNORE, chunk_rows_=32), hidden, weight)
        ref, ref_grads = _loss_and_grads(lambda: _reference(hidden, weight, labels), hidden,
                                         weight)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=2e-3, atol=2e-3)
    for got, want in zip(fused_grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_emulated_bf16_products_widen_once_and_equal_the_emulation(monkeypatch, smoothing):
    """On a CPU without bf16 GEMMs the chunks compute their bf16 products on fp32 operands
    rounded once: the loss equals `Bf16MatmulsInFp32`'s call-by-call emulation, the gradients
    differ only by the bf16 rounding of each chunk's products that the emulation adds; the
    same with or without that mode active."""
    from lmlab.models.layers import fused_cross_entropy
    from lmlab.precision import Bf16MatmulsInFp32

    hidden, weight, labels = _inputs(n_rows=3 * 40, d=32, vocab=256)

    def run(widen: bool, mode: bool):
        monkeypatch.setattr(fused_cross_entropy, "CPU_BF16_EMULATED", widen)
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                (Bf16MatmulsInFp32() if mode else contextlib.nullcontext()):
            return _loss_and_grads(lambda: linear_cross_entropy(
                hidden, weight, labels, IGNORE, smoothing, chunk_rows_=32), hidden, weight)

    want, want_grads = run(widen=False, mode=True)
    for mode in (True, False):
        got, got_grads = run(widen=True, mode=mode)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == b.dtype
            assert (a - b).abs().max() <= 0.01 * b.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_compiled_equals_eager(smoothing):
    """Compiled, each chunk's softmax takes its max/exp/sum form (`_chunk_loss`)."""
    hidden, weight, labels = _inputs()
    compiled = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, IGNORE, smoothing,
                                                                  chunk_rows_=16),
                             fullgraph=True)
    got, got_grads = _loss_and_grads(lambda: compiled(hidden, weight, labels), hidden, weight)
    want, want_grads = _loss_and_grads(lambda: _reference(hidden, weight, labels, smoothing),
                                       hidden, weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The traced graph is the max/exp/sum form, not the eager log-softmax.
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch._dynamo.reset()
    traced = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, IGNORE, smoothing,
                                                                chunk_rows_=16),
                           backend=record, fullgraph=True)
    traced(hidden, weight, labels)
    torch._dynamo.reset()
    assert "amax" in graphs[0] and "log_softmax" not in graphs[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiled_on_a_gpu_takes_the_plain_form_and_equals_the_chunked_one(reduction,
                                                                           monkeypatch):
    """Compiled on a GPU the loss is inductor's plain full-logits form (faster there): the
    same loss and gradients as the chunked autograd Function, in bf16 autocast as in a run."""
    from lmlab.models.layers import fused_cross_entropy
    hidden, weight, labels = (t.detach().cuda() for t in _inputs(n_rows=3 * 40, d=32,
                                                                   vocab=256))
    hidden.requires_grad_()
    weight.requires_grad_()
    plain_calls = []
    plain = fused_cross_entropy.plain_cross_entropy

    def spy(*args):
        plain_calls.append(torch.compiler.is_compiling())
        return plain(*args)

    monkeypatch.setattr(fused_cross_entropy, "plain_cross_entropy", spy)

    def loss(h, w, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, y, IGNORE, 0.1, reduction)

    compiled = torch.compile(loss, fullgraph=True)
    got, got_grads = _loss_and_grads(lambda: compiled(hidden, weight, labels), hidden, weight)
    assert plain_calls == [True]  # the plain form is what was traced
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, want_grads = _loss_and_grads(lambda: linear_cross_entropy(
            hidden, weight, labels, IGNORE, 0.1, reduction, chunk_rows_=32), hidden, weight)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max() <= 0.02 * b.abs().max()

    # Logits over the budget keep the chunks, compiled or not.
    monkeypatch.setattr(fused_cross_entropy, "PLAIN_COMPILED_MAX_LOGIT_BYTES", 1024)
    torch._dynamo.reset()
    over, over_grads = _loss_and_grads(lambda: torch.compile(loss, fullgraph=True)(
        hidden, weight, labels), hidden, weight)
    assert plain_calls == [True]
    torch.testing.assert_close(over, want, rtol=2e-3, atol=2e-3)
    for a, b in zip(over_grads, want_grads):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_chunk_rows_fit_the_device():
    assert chunk_rows(2048, 8192, torch.device("cpu")) == 1024  # 32 MiB of fp32 logits
    assert chunk_rows(10, 8192, torch.device("cpu")) == 10
    assert chunk_rows(100_000, 50304, torch.device("cuda")) % 16 == 0
    assert chunk_rows(100_000, 10**7, torch.device("cpu")) == 16


def _decoder(tie: bool):
    torch.manual_seed(0)
    return build_backbone(ModelConfig(
        vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn="swiglu",
        norm="rmsnorm", position="rope", bias=False, tie_embeddings=tie, max_seq_len=32)).train()


def _model_grads(model, loss):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


@pytest.mark.parametrize("tie", [True, False])
def test_decoder_loss_equals_cross_entropy_of_its_logits(tie):
    model = _decoder(tie)
    ids = torch.randint(0, 50, (2, 12))
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), IGNORE)), dim=1)
    assert fusable_head(model.lm_head)
    fused = model(ids, labels=labels, label_smoothing=0.05)
    ref = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                          label_smoothing=0.05)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    got, want = _model_grads(model, fused), _model_grads(model, ref)
    assert got.keys() == want.keys()
    assert ("lm_head.weight" in got) != tie  # tied: one parameter, reached from both ends
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_on_lm_head_takes_the_plain_path_and_trains_the_adapter():
    model = _decoder(tie=False)
    build_peft_strategy({"method": "lora", "r": 4, "alpha": 8,
                         "target_modules": ["q_proj", "lm_head"]}).apply(model)
    assert not fusable_head(model.lm_head)  # peft's lora.Linear wraps it
    with torch.no_grad():  # a non-zero update, so the adapter changes the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.roll(-1, dims=1)
    loss = model(ids, labels=labels)
    ref = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, ref)
    got, want = _model_grads(model, loss), _model_grads(model, ref)
    assert any("lm_head.lora" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_heads_that_are_not_plain_linears_are_called():
    hooked = nn.Linear(8, 20, bias=False)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    biased = nn.Linear(8, 20)
    assert not fusable_head(hooked) and not fusable_head(biased)
    hidden, labels = torch.randn(5, 8), torch.randint(0, 20, (5,))
    for head in (hooked, biased):
        torch.testing.assert_close(head_cross_entropy(hidden, head, labels),
                                   F.cross_entropy(head(hidden), labels))
