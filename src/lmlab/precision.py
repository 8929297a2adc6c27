"""bf16 matrix products on CPUs without bf16 instructions, computed in fp32 with bf16 rounding.

A CPU without AVX512-BF16 or AMX (this project's AVX2 machines) has no bf16 GEMM kernel:
PyTorch falls back to a scalar loop that is ~6.5x slower than the fp32 GEMM on the same
shapes (d_model 384, 2048 rows). A `trainer.precision=bf16-mixed` or `bf16-true` run then
spends ~97 % of its step in that loop, ~25x slower than the same run in fp32.

`Bf16MatmulsInFp32` computes those products the way the bf16 kernel defines them, on the fast
fp32 kernel: the operands are rounded to bf16 exactly as autocast rounds them (fp32 → bf16;
already-bf16 tensors are unchanged), widened to fp32 (exact), multiplied with fp32 accumulation
(what the bf16 kernels accumulate in: the products of two bf16 numbers are exact in fp32), and
the result is rounded to bf16. Values and dtypes therefore equal the bf16 kernel's up to the
order of the fp32 summation; gradients flow through the same casts, so d(input) and d(weight)
are rounded to bf16 as they are by the bf16 backward kernels.

`F.scaled_dot_product_attention` is treated the same way (bf16-rounded q, k, v and float mask,
the fp32 kernel, the output rounded to bf16): its bf16 CPU backward runs its products on the
same scalar loop, 5.7x slower than fp32's (8 x 6 heads x 256 x 64, 1 thread: 210 vs 37 ms).
Here the results are not those of the bf16 kernel up to summation order but slightly more
precise: that kernel also rounds the attention probabilities to bf16 before multiplying them
by v; the fp32 one keeps them in fp32, as flash kernels on a GPU keep their softmax statistics.
(lmlab's own causal training attention makes the same fp32 computation itself, in blocks, on
such a CPU: `models/layers/causal_attention.py`; those calls never reach SDPA.)
Everything else (norms, softmax, the optimizer) keeps its bf16/autocast behaviour.

`use_fp32_matmuls_for_emulated_bf16(trainer)` turns it on for a Lightning run's steps (the
precision plugin's forward context: training, validation, test, predict) when the run is bf16 on
such a CPU; elsewhere it changes nothing.

`trainer.precision: auto` (the default) is resolved here too: bf16 wherever the hardware has
bf16 matrix kernels, fp32 where bf16 would be emulated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# The matrix products autocast runs in bf16 on CPU (its lower-precision list) that models call,
# and einsum, whose contractions autocast sends to bf16 `bmm` below the Python level.
_MATMULS: frozenset[Callable[..., Any]] = frozenset({
    F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
    Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, Tensor.mm, Tensor.bmm,
    Tensor.addmm, Tensor.baddbmm,
})
BF16_PRECISIONS = ("bf16-mixed", "bf16-true")
AUTO = "auto"


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether `device` has bf16 GEMM kernels (every CUDA GPU lmlab supports; a CPU with
    AVX512-BF16 or AMX, as oneDNN reports)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Read once, at import (a constant to torch.compile): whether this CPU multiplies bf16 on a real
# kernel (oneDNN's AVX512-BF16 or AMX) or would emulate it.
CPU_BF16_EMULATED = not native_bf16_matmul("cpu")


def _tensors(args: Any, kwargs: dict[str, Any]) -> list[Tensor]:
    found = [a for a in args if isinstance(a, Tensor)]
    return found + [v for k, v in kwargs.items() if k != "out" and isinstance(v, Tensor)]


def _runs_in_bf16(tensors: list[Tensor]) -> bool:
    if any(t.device.type != "cpu" or not t.is_floating_point() for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return all(t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
    # Without autocast only all-bf16 operands make a bf16 product (mixed dtypes are an error the
    # plain call reports).
    return all(t.dtype == torch.bfloat16 for t in tensors)


def _widened(value: Any) -> Any:
    """A floating tensor rounded to bf16 as autocast rounds it, then widened to fp32 (exact)."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


def _in_fp32(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    out = kwargs.pop("out", None)
    with torch.autocast("cpu", enabled=False):
        result = func(*[_widened(a) for a in args],
                      **{k: _widened(v) for k, v in kwargs.items()}).to(torch.bfloat16)
        if out is not None:
            return out.copy_(result)
    return result


# Module-level helpers, not methods: torch.compile traces the mode's __torch_function__ and
# guards on what it calls (a staticmethod made its guard fail with "no attribute __func__").
def _attention_inputs(args: tuple, kwargs: dict[str, Any]) -> list[Tensor]:
    """q, k and v of an SDPA call: whether it runs in bf16 is theirs to say (a bool mask is
    not a floating operand, and a float mask follows them under autocast)."""
    named = [kwargs.get(name) for name in ("query", "key", "value")]
    found = list(args[:3]) + [t for t in named if t is not None]
    return [t for t in found if isinstance(t, Tensor)]


class Bf16MatmulsInFp32(TorchFunctionMode):
    """While active, CPU matrix products and SDPA calls that would run in bf16 (under CPU bf16
    autocast, or on bf16 operands) run on the fp32 kernel with bf16-rounded operands and result
    (see the module docstring). Calls that would not run in bf16 are left alone, errors
    included."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            tensors = _tensors(args, kwargs)
            if tensors and _runs_in_bf16(tensors):
                return _in_fp32(func, args, kwargs)
        elif func is F.scaled_dot_product_attention:
            tensors = _attention_inputs(args, kwargs)
            if len(tensors) == 3 and _runs_in_bf16(tensors):
                return _in_fp32(func, args, kwargs)
        return func(*args, **kwargs)


def _recompute_contexts() -> tuple[contextlib.AbstractContextManager,
                                   contextlib.AbstractContextManager]:
    from torch.overrides import _get_current_function_mode_stack

    emulating = any(isinstance(m, Bf16MatmulsInFp32) for m in _get_current_function_mode_stack())
    return contextlib.nullcontext(), Bf16MatmulsInFp32() if emulating else contextlib.nullcontext()


def checkpoint_layer(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)` whose
    recompute runs under `Bf16MatmulsInFp32` when the forward did. torch restores the forward's
    autocast state for the recompute but not its torch-function modes (backward runs outside
    the step's forward context), and without the mode the recompute saves bf16 tensors where
    the forward saved fp32 ones: torch's check stops the run ("Recomputed values ... have
    different metadata"). Under torch.compile the recompute is the traced graph, mode and all,
    and compile accepts no such `context_fn`, so there it is the plain call."""
    from torch.utils.checkpoint import checkpoint

    if not torch.compiler.is_compiling():
        kwargs.setdefault("context_fn", _recompute_contexts)
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def emulated_bf16(precision: str, device: torch.device | str) -> bool:
    """A bf16 `precision` on a device without bf16 GEMM kernels."""
    return precision in BF16_PRECISIONS and not native_bf16_matmul(device)


def matmul_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """`Bf16MatmulsInFp32` where `emulated_bf16(precision, device)`, else nothing: for code that
    runs lmlab models outside a Lightning step (benchmarks, scripts)."""
    return Bf16MatmulsInFp32() if emulated_bf16(precision, device) else contextlib.nullcontext()


def use_fp32_matmuls_for_emulated_bf16(trainer) -> bool:
    """Run the trainer's steps under `Bf16MatmulsInFp32` when its precision is bf16 and its
    device has no bf16 GEMM; returns whether it did."""
    strategy = trainer.strategy
    plugin = strategy.precision_plugin
    if not emulated_bf16(str(plugin.precision), strategy.root_device):
        return False
    plugin_context = plugin.forward_context

    @contextlib.contextmanager
    def forward_context() -> Iterator[None]:
        with plugin_context(), Bf16MatmulsInFp32():
            yield

    # An instance attribute: the plugin's train/val/test/predict step contexts call
    # `self.forward_context()`, and the plugin (chosen by Lightning from `precision`) stays the
    # one Lightning built, checkpoint state and gradient clipping included.
    plugin.forward_context = forward_context
    return True


def auto_precision(device_type: str) -> str:
    """What `trainer.precision=auto` means on `device_type` ("cpu" or "gpu"): bf16 autocast
    where bf16 GEMMs are native (a CUDA GPU that supports bf16, a CPU with AVX512-BF16/AMX),
    else 32-true (older GPUs; CPUs that would emulate bf16, where it is slower than fp32 even
    with `Bf16MatmulsInFp32`)."""
    if device_type == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if native_bf16_matmul("cpu") else "32-true"


def resolve_auto_precision(cfg) -> str | None:
    """Replace `trainer.precision: auto` in the run config `cfg` by the concrete precision for
    the accelerator it will use (before the Trainer is built; Lightning knows no "auto"), and
    return it; None when the precision was given explicitly."""
    from omegaconf import open_dict

    from lmlab.strategies.check import strategy_info

    if str(cfg.trainer.get("precision", "32-true")) != AUTO:
        return None
    resolved = auto_precision(strategy_info(cfg.trainer).accelerator)
    with open_dict(cfg.trainer):
        cfg.trainer.precision = resolved
    return resolved
