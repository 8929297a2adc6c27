"""Output projection + cross-entropy in row chunks, without the full logits tensor.

`F.cross_entropy(F.linear(h, W).float(), labels)` materialises [N, V] fp32 logits, reads and
writes them again for log-softmax, keeps them for backward, then fills a zero gradient of the
same size and runs log-softmax backward over it: at N = 2048, V = 8192 that is ~64 MB passed
through memory about six times per step, more than the matmuls' own traffic. Here the rows go
through in chunks (`CHUNK_BYTES` of fp32 logits each); each chunk's logits are turned into the
loss and, in the same pass, into d(loss)/d(logits) (softmax minus the smoothed one-hot), which is
immediately multiplied into d(hidden) and accumulated into d(weight). Backward only scales
those by the incoming gradient (Liger-Kernel's fused linear cross-entropy, in plain PyTorch so
it runs on every device and under `torch.compile`).

The matmuls run in the autocast dtype when autocast is on (as `nn.Linear` would); softmax and
the loss are fp32; d(weight) accumulates in fp32 across chunks. On a CPU without bf16 GEMM
kernels (see `lmlab.precision`) bf16 products are computed as that module computes them, on the
fp32 kernel with bf16-rounded operands, but each operand is rounded and widened once: the
weight once for every chunk and both of its products, each chunk's hidden rows and d(logits)
once for their two (`lmlab.precision` would widen them at every call). The logits are rounded to bf16 as a bf16
kernel's; each chunk's d(hidden) and d(weight) products are kept in fp32 until they are stored
(slightly more precise than the bf16 kernel, which rounds each chunk's product). An eager
fused loss at 2,048 x 8,192 took 0.89 instead of 1.01 s of CPU time (fwd + bwd; compiled,
inductor already fused the conversions: no change). Compiled on a GPU, the plain
form is traced instead while its logits fit `PLAIN_COMPILED_MAX_LOGIT_BYTES` (see
`linear_cross_entropy`): inductor fuses it and there it is faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.precision import CPU_BF16_EMULATED

REDUCTIONS = ("mean", "sum")
# Rows per chunk: smaller chunks keep the logits in a nearer cache but make smaller, less
# efficient GEMMs with more thread barriers; a GPU needs large matmuls to be efficient and has
# the memory bandwidth, so there the chunk is larger. On CPU, 32 MiB (1,024 rows at V 8192):
# whole bench-model training steps (N 2048, d 384, 2 threads, interleaved, CPU time) took
# 0.91-0.96x the time of 16 MiB chunks compiled in fp32 (three runs), 0.97-0.98x compiled in
# bf16 and 0.97x eager in bf16, the same eager in fp32; 1.01x on 1 thread eager. One chunk
# (64 MiB) was 1.02x slower again (compiled bf16).
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
DEFAULT_CHUNK_BYTES = 64 * 2**20
# Compiled on a GPU the plain form is faster (see `linear_cross_entropy`) but holds [N, V]
# logits: up to this size of fp32 logits (the GPT-2 recipe's 32k x 50304 is 6.1 GiB, and its
# bf16 logits and their gradient are half that each); beyond it (a 128k-256k vocabulary at a
# large batch) the chunks keep memory at N x d + V x d.
PLAIN_COMPILED_MAX_LOGIT_BYTES = 8 * 2**30


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk for `vocab`-wide fp32 logits on `device` (a multiple of 16, >= 16)."""
    target = CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)
    rows = max(16, target // (4 * vocab) // 16 * 16)
    return min(rows, max(n_rows, 1))


def fusable_head(head: nn.Module) -> bool:
    """Whether `head` is a plain bias-free `nn.Linear` whose weight can be used directly:
    adapted (peft LoRA), quantised, parametrised, sharded or hooked heads take the plain path,
    which calls the module."""
    return (type(head) is nn.Linear and head.bias is None and not head._forward_hooks
            and not head._forward_pre_hooks)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_loss(logits: Tensor, target: Tensor, label_smoothing: float
                ) -> tuple[Tensor, Callable[[], Tensor]]:
    """(each row's loss, a function giving the rows' softmax: call it at most once, it may
    overwrite the log-probabilities in place). Eager, torch's fused log-softmax plus one exp
    over it is the fastest form; compiled, inductor fuses the max/exp/sum form into fewer
    passes with one exp a logit: 8.9 against 12.7 ms of CPU time for a 512 x 8192 chunk (2
    threads), ~0.7 % of a compiled bench-model step."""
    smooth = logits.mean(dim=-1) if label_smoothing else None
    if torch.compiler.is_compiling():
        top = logits.amax(dim=-1, keepdim=True)
        exp = (logits - top).exp()
        total = exp.sum(dim=-1, keepdim=True)
        lse = (top + total.log()).squeeze(-1)
        loss = lse - logits.gather(-1, target).squeeze(-1)

        def probs() -> Tensor:
            return exp * total.reciprocal()
    else:
        logp = torch.log_softmax(logits, dim=-1)
        loss = -logp.gather(-1, target).squeeze(-1)
        # log p_t = z_t - lse; read only with smoothing, as the eager loss needs no z_t.
        lse = logits.gather(-1, target).squeeze(-1) + loss if smooth is not None else None

        def probs() -> Tensor:
            return logp.exp_()
    if smooth is not None:
        # -mean_j log p_j = lse - mean_j z_j: no second pass over the chunk.
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - smooth)
    return loss, probs


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                label_smoothing: float, reduction: str, rows: int, dtype: torch.dtype,
                grad_enabled: bool) -> Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        # forward runs with grad mode off: whether gradients are wanted was read by the caller.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        # bf16 products on a CPU that would emulate them: fp32 operands, bf16-rounded once.
        widened = dtype == torch.bfloat16 and hidden.device.type == "cpu" and CPU_BF16_EMULATED
        w = weight.to(dtype)
        if widened:
            w = w.float()
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0)
        keep = valid.to(dtype)[:, None]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_weight else None)
        # One buffer for every chunk's logits: a fresh multi-MiB tensor per chunk would cost
        # page faults (CPU) or allocator traffic.
        buffer = torch.empty(min(rows, n), vocab, dtype=w.dtype, device=hidden.device)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h = hidden[start:end].to(dtype)
            if widened:
                h = h.float()
            logits = torch.mm(h, w.t(), out=buffer[: end - start])
            logits = (logits.to(dtype) if widened else logits).float()
            target = safe_labels[start:end, None]
            loss, probs = _chunk_loss(logits, target, label_smoothing)
            losses[start:end] = loss
            if need_hidden or need_weight:
                # d(row loss)/d(logits) = softmax - (1 - eps) onehot - eps / V. Ignored rows are
                # zeroed on the narrow side of each product (h and d(h), d wide, not V wide).
                grad = probs()
                if label_smoothing:
                    grad.sub_(label_smoothing / vocab)
                grad.scatter_add_(-1, target, grad.new_full(target.shape, label_smoothing - 1.0))
                grad = grad.to(dtype)
                if widened:
                    grad = grad.float()
                row_keep = keep[start:end]
                if need_hidden:
                    grad_hidden[start:end] = (grad @ w).mul_(row_keep)
                if need_weight:
                    h_kept = h * row_keep
                    if h_kept.dtype == torch.float32:  # accumulate in place, no [V, d] temporary
                        grad_weight.addmm_(grad.t(), h_kept)
                    else:
                        grad_weight.add_(grad.t() @ h_kept)
        total = (losses * valid).sum()
        scale = 1.0 / valid.sum() if reduction == "mean" else None  # none valid: nan, as F does
        if scale is not None:
            total = total * scale
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_output if scale is None else grad_output * scale
        if grad_hidden is not None:
            grad_hidden = grad_hidden * factor.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * factor
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_rows_: int | None = None) -> Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), labels.flatten(),
    ignore_index, label_smoothing, reduction)` computed chunk by chunk (see the module
    docstring), or in that plain form when compiled on a GPU with fp32 logits of at most
    `PLAIN_COMPILED_MAX_LOGIT_BYTES`. hidden [..., d], weight [V, d], labels [...]; reduction
    "mean" or "sum"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r} (valid: {', '.join(REDUCTIONS)})")
    hidden = hidden.flatten(0, -2)
    labels = labels.flatten()
    if (chunk_rows_ is None and hidden.is_cuda and torch.compiler.is_compiling()
            and hidden.shape[0] * weight.shape[0] * 4 <= PLAIN_COMPILED_MAX_LOGIT_BYTES):
        # Compiled on a GPU, inductor fuses the plain form's upcast, log-softmax and their
        # gradient into a pass or two over the logits, and one full-width matmul per product
        # runs at the GEMMs' best rate; chunks only cost: GPT-2 small on an H100 (V 50304,
        # 16 x 1024 tokens) took 38.95 ms/step chunked against 36.28 plain, and 9.5 GiB against
        # 8.4 (`python -m bench.profile_step`, variants `fused` and `step`).
        return plain_cross_entropy(F.linear(hidden, weight), labels, ignore_index,
                                   label_smoothing, reduction)
    rows = chunk_rows_ or chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    dtype = _compute_dtype(weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, label_smoothing,
                                         reduction, rows, dtype, torch.is_grad_enabled())


def plain_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                        label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """The reference: fp32 cross-entropy over every position's logits [..., V]."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def head_cross_entropy(hidden: Tensor, head: nn.Module, labels: Tensor, ignore_index: int = -100,
                       label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of `head(hidden)` against `labels`: fused (`linear_cross_entropy`) when
    `fusable_head(head)`, else the plain path through the module (adapters, hooks and
    quantisation keep working)."""
    if fusable_head(head) and reduction in REDUCTIONS:
        return linear_cross_entropy(hidden, head.weight, labels, ignore_index, label_smoothing,
                                    reduction)
    return plain_cross_entropy(head(hidden), labels, ignore_index, label_smoothing, reduction)
