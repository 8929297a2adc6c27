"""Adafactor (Shazeer & Stern 2018) without host reads: `torch.optim.Adafactor`'s update, with its
two per-tensor scalars kept on the device.

torch's implementation turns the relative step size max(eps2, RMS(w)) * rho_t and the update
clipping max(1, RMS(u) / d) into Python numbers with `.item()`, two per parameter tensor per
step: on a GPU each one waits for everything queued before it (a 124M GPT-2 has 148 tensors,
so ~300 waits a step). Here both stay 0-dim device tensors, computed with multi-tensor norms,
and the step count, which torch keeps on the host, is read there. Same hyperparameters, same
state (`step`, `row_var`, `col_var`, `variance`), so checkpoints move between the two; the
results agree to rounding (float32 on the device instead of float64 on the host for those two
scalars).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Adafactor(torch.optim.Adafactor):
    """`torch.optim.Adafactor` whose step reads nothing from the device (see the module)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, row_vars, col_vars, variances, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, row_vars, col_vars, variances, steps)
            if not params:
                continue
            # Group by what the update's shape depends on; without foreach, one tensor at a time.
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                key = (p.device, p.dtype, p.dim() > 1) if group["foreach"] is not False else (i,)
                groups.setdefault(key, []).append(i)
            for members in groups.values():
                _adafactor([params[i] for i in members], [grads[i] for i in members],
                           [row_vars[i] for i in members], [col_vars[i] for i in members],
                           [variances[i] for i in members], [steps[i] for i in members], group)
        return loss


def _adafactor(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor | None],
               col_vars: list[Tensor | None], variances: list[Tensor | None], steps: list[Tensor],
               group: dict) -> None:
    """One step for tensors of one device, dtype and dimensionality (matrices factored)."""
    lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]  # a host tensor
    eps1, eps2 = group["eps"]
    if eps1 is None:
        eps1 = torch.finfo(params[0].dtype).eps
    d, beta2_decay, weight_decay = group["d"], group["beta2_decay"], group["weight_decay"]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    for s in steps:  # host tensors: reading them waits for nothing
        s.add_(1.0)
    t = [float(s) for s in steps]
    one_minus_beta2 = [ti ** beta2_decay for ti in t]
    rho = [min(lr, 1 / math.sqrt(ti)) for ti in t]
    root_numel = [math.sqrt(p.numel()) for p in params]

    # alpha = max(eps2, RMS(w)) * rho_t, on the device (before weight decay, as torch)
    # the scalars in at least fp32 for bf16/fp16 parameters too (torch rounds the norms to the
    # parameter's dtype first: within one bf16 ulp of it)
    scalar_dtype = torch.promote_types(params[0].dtype, torch.float32)
    alphas = list(torch._foreach_norm(params, 2, dtype=scalar_dtype))
    torch._foreach_div_(alphas, root_numel)
    torch._foreach_clamp_min_(alphas, eps2)
    torch._foreach_mul_(alphas, rho)

    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)

    if params[0].dim() > 1:
        # the row and column means of g^2, as norms (no g^2 of the matrix's size)
        for factors, dim in ((row_vars, -1), (col_vars, -2)):
            means = [torch.linalg.vector_norm(g, dim=dim, keepdim=True) for g in grads]
            torch._foreach_mul_(means, means)
            torch._foreach_div_(means, [g.size(dim) for g in grads])
            torch._foreach_lerp_(factors, means, one_minus_beta2)
        estimates = [r @ c for r, c in zip(row_vars, col_vars, strict=True)]
        row_means = [r.mean(dim=-2, keepdim=True) for r in row_vars]
        torch._foreach_clamp_min_(row_means, eps1)
        torch._foreach_div_(estimates, row_means)
    else:
        torch._foreach_lerp_(variances, torch._foreach_mul(grads, grads), one_minus_beta2)
        estimates = [v.clone() for v in variances]

    # update = g / sqrt(max(V, eps1^2)); scale -alpha / max(1, RMS(update) / d), on the device
    torch._foreach_clamp_min_(estimates, eps1 * eps1)
    torch._foreach_rsqrt_(estimates)
    torch._foreach_mul_(estimates, grads)
    clip = list(torch._foreach_norm(estimates, 2, dtype=scalar_dtype))
    torch._foreach_div_(clip, [r * d for r in root_numel])
    torch._foreach_clamp_min_(clip, 1.0)
    scales = torch._foreach_div(alphas, clip)
    torch._foreach_neg_(scales)
    for update, scale in zip(estimates, scales, strict=True):
        update.mul_(scale)
    torch._foreach_add_(params, estimates)
