"""Mamba (Gu & Dao 2023): a selective state-space token mixer, in plain PyTorch.

in_proj splits the input into a stream x and a gate z; x goes through a causal depthwise
convolution and SiLU, then predicts its own step size Δ and projections B, C (that is what
makes the SSM *selective*), runs the scan of `selective_scan.py`, adds the skip D x, and is
gated by SiLU(z) before out_proj. Training scans the whole sequence in parallel; generation
advances the state one token at a time, O(1) in the sequence length, with the conv inputs and
the SSM state kept in a `LayerSSMCache`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.layers.selective_scan import selective_scan, ssm_step

if TYPE_CHECKING:
    from lmlab.models.cache import LayerSSMCache

# Mamba's step-size init: Δ log-uniform in [DT_MIN, DT_MAX] at initialisation (floored at
# DT_FLOOR), so channels start with memories from ~10 to ~1000 tokens.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


class MambaMixer(nn.Module):
    """Mamba-1 block body: in_proj → causal depthwise conv → SiLU → selective SSM, gated by
    SiLU(z), → out_proj. Token mixer with the same call shape as attention.

    `token_mask` [B, T] (1 = real token) makes pads invisible: their conv input is zeroed and
    their step Δ set to 0 (decay 1, no input), so a left-padded prompt reaches its first real
    token with the zero state an unpadded one starts from.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bias: bool = False,
        chunk_size: int = 16,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        # Left context comes from explicit zeros or the cached inputs, so no built-in padding.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        # Weight decay on A_log would pull every channel's decay rate towards exp(0) = 1; the
        # flag is Mamba's convention for optimizer grouping to leave these two undecayed.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init for the SSM-specific parameters; models call it after their generic
        Linear init, which would otherwise zero the step-size bias."""
        # S4D-real: A_n = -(n + 1), the same for every channel.
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN))
                       + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        cache: LayerSSMCache | None = None,
    ) -> Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; with `cache`, continue from and update it."""
        batch, T, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        if token_mask is not None:
            keep = token_mask.to(xs.dtype)[..., None]
            xs = xs * keep
        xs = xs.transpose(1, 2)  # [B, d_inner, T]
        past = (cache.conv_state.to(xs.dtype) if cache is not None
                else xs.new_zeros(batch, self.d_inner, self.d_conv - 1))
        window = torch.cat([past, xs], dim=-1)
        u = F.silu(self.conv1d(window)).transpose(1, 2)  # [B, T, d_inner]

        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        if token_mask is not None:
            dt = dt * keep
        A = -torch.exp(self.A_log.float())
        if cache is not None and T == 1:
            y, state = ssm_step(cache.ssm_state, u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            y = y[:, None]
        else:
            state0 = cache.ssm_state if cache is not None else None
            y, state = selective_scan(u, dt, A, B, C, state0, self.chunk_size)
        if cache is not None:
            cache.conv_state.copy_(window[..., window.shape[-1] - (self.d_conv - 1):])
            cache.ssm_state.copy_(state)

        y = y.to(u.dtype) + u * self.D.to(u.dtype)
        return self.out_proj(y * F.silu(z))
