"""bf16 products on the fp32 kernel: same values as the bf16 kernel, no bf16 GEMM left."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.models import ModelConfig, build_backbone
from lmlab.precision import (
    Bf16MatmulsInFp32,
    emulated_bf16,
    matmul_context,
    native_bf16_matmul,
    use_fp32_matmuls_for_emulated_bf16,
)
from lmlab.tasks.clm import causal_lm_loss
from tests.bf16_close import BF16_ULP, assert_bf16_close

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.baddbmm.default}


class GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every GEMM the dispatcher runs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


PRODUCTS = {
    "linear": lambda x, w, b, y: F.linear(x, w, b),
    "matmul": lambda x, w, b, y: torch.matmul(x, w.t()),
    "operator": lambda x, w, b, y: x @ w.t(),
    "mm": lambda x, w, b, y: torch.mm(x, w.t()),
    "addmm": lambda x, w, b, y: torch.addmm(b, x, w.t()),
    "bmm": lambda x, w, b, y: torch.bmm(y, y.transpose(1, 2)),
    "baddbmm": lambda x, w, b, y: torch.baddbmm(y @ y.transpose(1, 2), y, y.transpose(1, 2)),
    "einsum": lambda x, w, b, y: torch.einsum("btd,bsd->bts", y, y),
}


def _operands(dtype: torch.dtype):
    torch.manual_seed(0)
    return [torch.randn(*shape, dtype=dtype, requires_grad=True)
            for shape in ((32, 48), (40, 48), (40,), (3, 16, 24))]


@pytest.mark.parametrize("name", sorted(PRODUCTS))
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-operands"])
def test_values_and_gradients_match_the_bf16_kernel(name, autocast):
    product = PRODUCTS[name]
    results = {}
    for fp32_kernel in (False, True):
        operands = _operands(torch.float32 if autocast else torch.bfloat16)
        recorder = GemmDtypes()
        # backward outside autocast, as PyTorch prescribes and Lightning and the bench do
        with recorder:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                if fp32_kernel:
                    with Bf16MatmulsInFp32():
                        out = product(*operands)
                else:
                    out = product(*operands)
            out.float().square().sum().backward()
        results[fp32_kernel] = (out, [o.grad for o in operands if o.grad is not None], recorder)
    (ref, ref_grads, ref_gemms), (out, grads, gemms) = results[False], results[True]
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, ref)
    assert len(grads) == len(ref_grads) > 0
    for grad, ref_grad in zip(grads, ref_grads):
        assert_bf16_close(grad, ref_grad)
    assert ref_gemms.dtypes == {torch.bfloat16}
    assert gemms.dtypes == {torch.float32}  # forward and backward on the fp32 kernel


class AttentionDtypes(TorchDispatchMode):
    """Records the q dtype of every SDPA kernel call (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.name():
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mask", ["causal", "bool", "float"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-operands"])
def test_attention_runs_on_the_fp32_kernel_and_matches_the_bf16_one(mask, autocast):
    """Output within bf16 rounding of the bf16 kernel's, gradients at least as close to the
    fp32 computation as the bf16 kernel's (that kernel also rounds the probabilities)."""
    gen = torch.Generator().manual_seed(3)
    shapes = ((2, 4, 24, 16), (2, 2, 24, 16), (2, 2, 24, 16))  # grouped KV heads
    base = [torch.randn(*s, generator=gen) for s in shapes]
    keep = torch.rand(2, 1, 24, 24, generator=gen) > 0.2
    keep[..., 0] = True
    masks = {"causal": None, "bool": keep,
             "float": torch.where(keep, 0.0, -1e4) + torch.randn(2, 1, 24, 24, generator=gen)}
    dtype = torch.float32 if autocast else torch.bfloat16

    def attend(kind: str):
        q, k, v = (t.to(dtype if kind != "fp32" else torch.float32).requires_grad_()
                   for t in base)
        m = masks[mask]
        m = m.to(q.dtype) if m is not None and m.is_floating_point() else m
        recorder = AttentionDtypes()
        with recorder:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast and kind != "fp32"):
                with Bf16MatmulsInFp32() if kind == "emulated" else contextlib.nullcontext():
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                         is_causal=mask == "causal",
                                                         enable_gqa=True)
            out.float().square().sum().backward()
        return out, [t.grad.float() for t in (q, k, v)], recorder.dtypes

    native, native_grads, native_dtypes = attend("native")
    emulated, grads, dtypes = attend("emulated")
    exact, exact_grads, _ = attend("fp32")
    assert native_dtypes == {torch.bfloat16} and dtypes == {torch.float32}
    assert_bf16_close(emulated, native)
    for grad, native_grad, exact_grad in zip(grads, native_grads, exact_grads):
        scale = exact_grad.abs().max()
        # bf16 inputs and outputs either way: both are within a few bf16 steps of fp32 ...
        assert ((grad - exact_grad).abs().max() / scale).item() < 0.05
        # ... and the fp32 kernel, which keeps the probabilities in fp32, is not further off.
        assert (grad - exact_grad).norm() <= (native_grad - exact_grad).norm() * 1.05


def test_out_argument_receives_the_bf16_result():
    x, w, _, _ = _operands(torch.bfloat16)
    out = torch.empty(32, 40, dtype=torch.bfloat16)
    with torch.no_grad(), Bf16MatmulsInFp32():
        returned = torch.mm(x, w.t(), out=out)
    assert returned is out
    assert_bf16_close(out, torch.mm(x.detach(), w.detach().t()))


def test_other_products_are_left_alone():
    x, w, _, _ = _operands(torch.float32)
    recorder = GemmDtypes()
    with Bf16MatmulsInFp32(), recorder, torch.no_grad():
        plain = F.linear(x, w)  # fp32 without autocast: the fp32 product, bit for bit
        with pytest.raises(RuntimeError):  # mixed dtypes stay the error they are
            torch.mm(x, w.t().to(torch.bfloat16))
        ints = torch.ones(2, 3, dtype=torch.long) @ torch.ones(3, 2, dtype=torch.long)
    assert torch.equal(plain, F.linear(x.detach(), w.detach()))
    assert ints.dtype == torch.long and int(ints.sum()) == 12


def _tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(
        vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, ffn="swiglu",
        norm="rmsnorm", position="rope", bias=False, tie_embeddings=False, max_seq_len=32))


def test_a_training_step_matches_native_bf16_autocast():
    """The clm loss (fused output layer + cross-entropy included) and every gradient."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    results = {}
    for fp32_kernel in (False, True):
        model = _tiny_backbone()
        recorder = GemmDtypes()
        with recorder:
            with torch.autocast("cpu", torch.bfloat16):
                with Bf16MatmulsInFp32() if fp32_kernel else torch.autocast("cpu", torch.bfloat16):
                    loss = causal_lm_loss(model, ids, labels)
            loss.backward()
        results[fp32_kernel] = (loss, {n: p.grad for n, p in model.named_parameters()}, recorder)
    (ref_loss, ref_grads, ref_gemms), (loss, grads, gemms) = results[False], results[True]
    assert abs(loss.item() - ref_loss.item()) <= 4 * BF16_ULP * ref_loss.item()
    for name, grad in grads.items():
        # bf16 gradients of a whole network: within a few bf16 steps of the native ones.
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert ((grad - ref_grads[name]).abs().max() / scale).item() < 0.05, name
    assert torch.bfloat16 in ref_gemms.dtypes
    assert gemms.dtypes == {torch.float32}


def test_emulation_is_a_property_of_the_precision_and_the_device():
    assert not emulated_bf16("32-true", "cpu")
    assert emulated_bf16("bf16-mixed", "cpu") == (not native_bf16_matmul("cpu"))
    assert emulated_bf16("bf16-true", "cpu") == (not native_bf16_matmul("cpu"))
    assert not emulated_bf16("bf16-mixed", "cuda")
    assert isinstance(matmul_context("bf16-mixed", "cpu"), Bf16MatmulsInFp32) == (
        not native_bf16_matmul("cpu"))
    assert not isinstance(matmul_context("32-true", "cpu"), Bf16MatmulsInFp32)


@pytest.mark.skipif(native_bf16_matmul("cpu"), reason="this CPU has bf16 GEMM kernels")
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_lightning_steps_use_the_fp32_kernel_for_bf16_runs(precision):
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    assert use_fp32_matmuls_for_emulated_bf16(trainer) == (precision != "32-true")
    dtype = torch.float32 if precision != "bf16-true" else torch.bfloat16
    x, w = torch.randn(8, 16, dtype=dtype), torch.randn(4, 16, dtype=dtype)
    recorder = GemmDtypes()
    with trainer.precision_plugin.train_step_context(), recorder:
        out = F.linear(x, w)
    assert recorder.dtypes == {torch.float32}
    assert out.dtype == (torch.float32 if precision == "32-true" else torch.bfloat16)


@pytest.mark.slow
def test_compiled_models_trace_through_it():
    """`model.compile=true` with a bf16 precision: dynamo traces the mode (its helpers are
    module functions, which its guards can name) and the compiled step keeps the values."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    model = _tiny_backbone()
    compiled = torch.compile(model)
    losses = []
    for module in (model, compiled):
        with torch.autocast("cpu", torch.bfloat16), Bf16MatmulsInFp32():
            loss = causal_lm_loss(module, ids, labels)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=4 * BF16_ULP)
    torch._dynamo.reset()


def _trainer_cfg(**fields):
    from omegaconf import OmegaConf
    return OmegaConf.create({"trainer": {"accelerator": "auto", "devices": 1, **fields}})


def test_auto_precision_is_bf16_where_bf16_gemms_are_native(monkeypatch):
    import lmlab.precision as precision

    cfg = _trainer_cfg(precision="auto")
    expected = "bf16-mixed" if native_bf16_matmul("cpu") else "32-true"
    if not torch.cuda.is_available():
        assert precision.resolve_auto_precision(cfg) == expected
        assert cfg.trainer.precision == expected
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: True)  # an AMX CPU
    assert precision.auto_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, resolved in ((True, "bf16-mixed"), (False, "32-true")):  # Ampere+, older
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        cfg = _trainer_cfg(precision="auto", accelerator="gpu")
        assert precision.resolve_auto_precision(cfg) == resolved
        assert cfg.trainer.precision == resolved


def test_an_explicit_precision_is_kept():
    from lmlab.precision import resolve_auto_precision

    for value in ("32-true", "bf16-mixed", "bf16-true"):
        cfg = _trainer_cfg(precision=value)
        assert resolve_auto_precision(cfg) is None
        assert cfg.trainer.precision == value
