"""oneDNN-prepacked fp32 linear weights for CPU generation.

A decode step multiplies B rows (one new token per sequence) by every weight matrix, so its
GEMMs are skinny and bound by streaming the weights. `F.linear` with MKL reads the [out, in]
weight as a transposed operand; oneDNN's inner product on a weight reordered once into its
blocked layout (`mkldnn._reorder_linear_weight`, what inductor's CPU freezing does) streams it
faster: at the bench dimensions (d_model 384, FFN 1024, vocab 8192, batch 8) the decode step's
matmuls take ~20 % less time, the [8, 384] x [384, 8192] output layer half. Results differ from
`F.linear` only in fp32 summation order (~1e-6 relative).

Reordering costs about as much as it saves over one 64-token generation, so the reordered
copy is kept (one extra copy of each eligible weight, freed with the weight) and reused while the
weight is unchanged: its in-place version counter and storage are part of the key, so an
in-place write or a `load_state_dict` makes the next generation reorder again. Fused optimizers
write without bumping the version counter: after their steps `clear_prepacked()` must run (lmlab's
tasks call it at the start of each validation/test/predict epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.fused_projection import fusable, plain_linear

# oneDNN's inner product costs ~35 us per call before any arithmetic (4 us for MKL's `linear`):
# smaller weights stay on `F.linear`, where streaming the weight is not what takes the time.
MIN_PREPACKED_NUMEL = 1 << 17

# weight -> ((version, data_ptr), reordered weight); entries die with their weight.
_REORDERED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# q_proj.weight -> (versions and storages of q/k/v weights and biases, fused weight, bias).
_FUSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def clear_prepacked() -> None:
    """Forget every reordered and fused copy. Needed after weights were written by something
    that bumps no version counter: fused optimizers (`torch.optim.AdamW(fused=True)`, lmlab's
    default) update parameters in place without it, so the next generation would run on the
    copies of the weights before the step. Tasks call it at the start of every evaluation."""
    _REORDERED.clear()
    _FUSED.clear()


def prepack_available() -> bool:
    """oneDNN is compiled in and not switched off (`torch.backends.mkldnn.enabled`)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _eligible(module: nn.Module) -> bool:
    """A `plain_linear` (what a subclass, a replaced forward or a hook computes is not
    weight @ x + bias) with a 2-D fp32 CPU weight and an fp32 bias, what oneDNN's op takes."""
    if not plain_linear(module):
        return False
    weight, bias = module.weight, module.bias
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and (bias is None or bias.dtype == torch.float32))


def _state(tensor: Tensor) -> tuple[int, int]:
    """What changes when `tensor` is written: its version (in-place ops) and storage."""
    # Inference tensors (the fused weights, built during generation) keep no version: nothing
    # writes them after they are built.
    return (0 if tensor.is_inference() else tensor._version, tensor.data_ptr())


def reordered_weight(weight: Tensor) -> Tensor:
    """The oneDNN-layout copy of `weight`, reordered again only when `weight` has changed."""
    key = _state(weight)
    entry = _REORDERED.get(weight)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        _REORDERED[weight] = entry
    return entry[1]


def _prepacked_linear(op: Callable[..., Tensor], weight: Tensor, packed: Tensor,
                      bias: Tensor | None, x: Tensor) -> Tensor:
    # Called ~30 times per decode step: the op's overload is resolved once (`op`), and inputs
    # the prepacked op cannot take get the plain layer's behaviour, errors included.
    if x.dtype is not torch.float32:
        return F.linear(x, weight, bias)
    return op(x, packed, bias, "none", [], "")


def _fusable(attn: MultiHeadAttention) -> bool:
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    return "qkv_proj" not in attn.__dict__ and fusable(parts) and all(map(_eligible, parts))


def fused_qkv_weight(attn: MultiHeadAttention) -> tuple[Tensor, Tensor | None]:
    """cat(q_proj, k_proj, v_proj) weight and bias, rebuilt only when one of them changed."""
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    tensors = [t for p in parts for t in (p.weight, p.bias) if t is not None]
    key = tuple(_state(t) for t in tensors)
    entry = _FUSED.get(attn.q_proj.weight)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts])
            bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in parts])
        entry = (key, weight, bias)
        _FUSED[attn.q_proj.weight] = entry
    return entry[1], entry[2]


@contextmanager
def prepacked_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While active, eligible linear layers of `model` multiply with prepacked weights.

    Attention layers whose q/k/v projections are all eligible get one matmul over the
    concatenated weights (`MultiHeadAttention.qkv_proj`); every other eligible `nn.Linear` gets
    an instance `forward` on its own prepacked weight. Weights under `MIN_PREPACKED_NUMEL`
    elements keep `F.linear` (the q/k/v matmul is fused all the same). Both are removed on
    exit. For inference only: the prepacked op has no autograd. Yields how many layers were
    switched (0 when disabled, without oneDNN, or under autocast, whose dtype choice for
    `linear` the prepacked op would bypass).
    """
    if not enabled or not prepack_available() or torch.is_autocast_enabled("cpu"):
        yield 0
        return
    op = torch.ops.mkldnn._linear_pointwise.default
    fused: list[MultiHeadAttention] = []
    switched: list[nn.Linear] = []
    try:
        covered: set[int] = set()
        for module in model.modules():
            if isinstance(module, MultiHeadAttention) and _fusable(module):
                weight, bias = fused_qkv_weight(module)
                module.qkv_proj = (
                    partial(_prepacked_linear, op, weight, reordered_weight(weight), bias)
                    if weight.numel() >= MIN_PREPACKED_NUMEL
                    else partial(F.linear, weight=weight, bias=bias))
                fused.append(module)
                covered.update(id(p) for p in (module.q_proj, module.k_proj, module.v_proj))
        for module in model.modules():
            if (id(module) not in covered and _eligible(module)
                    and module.weight.numel() >= MIN_PREPACKED_NUMEL):
                module.forward = partial(_prepacked_linear, op, module.weight,
                                         reordered_weight(module.weight), module.bias)
                switched.append(module)
        yield len(fused) + len(switched)
    finally:
        for module in fused:
            del module.qkv_proj
        for module in switched:
            del module.forward
