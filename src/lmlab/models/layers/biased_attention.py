"""Attention with a learned additive bias (T5's relative positions) on the CPU.

`F.scaled_dot_product_attention` has no fused CPU kernel that returns a gradient for
`attn_mask`, so a bias that requires grad sends it to its unfused math path, which also pays
for a "safe" softmax (`isneginf`/`all`/`where` passes over every [B, H, T, S] score tensor)
and scales q and k separately. `learned_bias_attention` is the same computation written for
this case: the scale and bias go into one `baddbmm`, a plain softmax (every row keeps at least
its own key, see `build_attention_mask`), and for causal layers the scores are computed in
blocks of query rows that skip the keys after the block's last query, about 40 % of a causal
layer's score work. The backward pass is written out (`LearnedBiasAttention.backward`), so
the block structure carries over to it and the bias gradient is summed to the bias's shape
block by block. Attention dropout is applied to the probabilities as in SDPA (a kept entry is
scaled by 1 / (1 - p)), from its own keep masks. Grouped KV heads are not supported: `applies`
says when to use it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Query rows per block of a causal layer: 64 measured fastest at T = 256 (32: more, smaller
# matmuls; 128: less skipped work).
ROWS_PER_BLOCK = 64

# bf16/fp16 keep SDPA, whose handling of reduced precision stays the reference there: this path
# was measured and tested in fp32/fp64 only.
FULL_PRECISION = (torch.float32, torch.float64)


def applies(q: Tensor, k: Tensor, attn_mask: Tensor | None, dropout_p: float = 0.0) -> bool:
    """Whether `learned_bias_attention` should replace SDPA for this call: a float mask that
    needs a gradient, fp32/fp64 on the CPU, without grouped KV heads, outside torch.compile
    (inductor generates its own kernels for the math path); any dropout below 1."""
    return (attn_mask is not None and attn_mask.requires_grad and attn_mask.is_floating_point()
            and q.device.type == "cpu" and q.dtype in FULL_PRECISION
            and 0.0 <= dropout_p < 1.0 and q.shape[1] == k.shape[1]
            and not torch.compiler.is_compiling())


def keep_mask(shape: tuple[int, ...], dropout_p: float, device: torch.device) -> Tensor:
    """Bool, True where an attention probability survives dropout (a function so tests can
    record the masks and build the reference from them)."""
    return torch.rand(shape, device=device) >= dropout_p


def learned_bias_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                           causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, SDPA's contract for a float `attn_mask`.

    q [B, H, T, D], k/v [B, H, S, D]; bias broadcastable to [B, H, T, S], -inf where a key is
    masked, at least one finite key per row. `causal`: the bias masks every key after the
    query's bottom-right aligned position (query t of T sees keys up to S - T + t), so those
    scores are not computed at all.
    """
    if bias.dim() != 4:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    T, S = q.shape[-2], k.shape[-2]
    if bias.shape[-2:] != (T, S):
        bias = bias.expand(*bias.shape[:2], T, S)  # a view; autograd sums its gradient back
    return LearnedBiasAttention.apply(q, k, v, bias.to(q.dtype), 1.0 / math.sqrt(q.shape[-1]),
                                      causal, float(dropout_p))


def _spans(T: int, S: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of every block of query rows."""
    if not causal or T <= ROWS_PER_BLOCK:
        return [(0, T, S)]
    return [(t0, min(t0 + ROWS_PER_BLOCK, T), min(S, S - T + min(t0 + ROWS_PER_BLOCK, T)))
            for t0 in range(0, T, ROWS_PER_BLOCK)]


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a [B, H, t, s] gradient over the dims the bias was broadcast along."""
    dims = [d for d in range(2) if shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class LearnedBiasAttention(torch.autograd.Function):
    """Forward keeps each block's probabilities for backward (as the math path keeps the
    whole [B, H, T, S] tensor); backward is softmax's and the matmuls' gradients per block.

    The output is a [B, H, T, D] view of a [B, T, H, D] buffer, the layout the attention
    layer's output projection reads, so its `transpose(1, 2).reshape` costs no copy.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float,  # type: ignore[override]
                causal: bool, dropout_p: float) -> Tensor:
        # Contiguous [B, H, T, D] once, so every block below is a view the matmuls take as is.
        k, v = k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        S = k.shape[-2]
        spans = _spans(T, S, causal)
        out = q.new_empty(B, T, H, D).transpose(1, 2)
        # q * scale, kept for backward (d(k) = d(scores)^T (q * scale)), written contiguous in
        # the same pass that would otherwise only copy q out of the projection's layout.
        qs = torch.mul(q, scale, out=torch.empty_like(q, memory_format=torch.contiguous_format))
        probs, keeps = [], []

        def dropped(p: Tensor) -> Tensor:
            if dropout_p == 0.0:
                return p
            keep = keep_mask(tuple(p.shape), dropout_p, p.device)
            keeps.append(keep.view(B, H, *keep.shape[-2:]))  # as the saved probabilities
            return p * keep * (1.0 / (1.0 - dropout_p))

        if len(spans) == 1:
            # One block: one matmul over the B * H heads, then the bias added in place (a
            # broadcast add, no [B, H, T, S] copy of a bias shared across rows).
            n = B * H
            scores = torch.bmm(qs.view(n, T, D), k.view(n, S, D).transpose(1, 2))
            scores.view(B, H, T, S).add_(bias)
            p = torch.softmax(scores, dim=-1)
            del scores
            out.copy_(torch.bmm(dropped(p), v.view(n, S, D)).view(B, H, T, D))
            probs.append(p.view(B, H, T, S))
        else:
            for t0, t1, s1 in spans:
                scores = torch.matmul(qs[:, :, t0:t1], k[:, :, :s1].transpose(-1, -2))
                scores += bias[..., t0:t1, :s1]
                p = torch.softmax(scores, dim=-1)
                del scores
                out[:, :, t0:t1] = torch.matmul(dropped(p), v[:, :, :s1])
                probs.append(p)
        ctx.save_for_backward(qs, k, v, *probs, *keeps)
        ctx.spans, ctx.scale, ctx.bias_shape = spans, scale, bias.shape
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        qs, k, v, *saved = ctx.saved_tensors
        scale, spans, bias_shape, dropout_p = ctx.scale, ctx.spans, ctx.bias_shape, ctx.dropout_p
        probs = saved[:len(spans)]
        keeps = saved[len(spans):] or [None] * len(spans)
        need_bias = ctx.needs_input_grad[3]
        rescale = 1.0 / (1.0 - dropout_p)
        B, H, T, D = qs.shape
        S = k.shape[-2]
        n = B * H
        dout = dout.contiguous()
        dq = torch.empty_like(qs)
        dk = dv = dbias = None
        if need_bias and len(spans) > 1:
            dbias = qs.new_zeros(bias_shape)  # the keys no block reached get no gradient
        # The last block reaches every key: its gradients initialise dk and dv, the earlier
        # blocks' are added to their prefix of the keys (a matmul into a fresh tensor, then one
        # add: `baddbmm_` into the strided prefix view fell back to one tiny GEMM per head).
        for p, keep, (t0, t1, s1) in reversed(list(zip(probs, keeps, spans))):
            do = dout[:, :, t0:t1]
            dp = torch.matmul(do, v[:, :, :s1].transpose(-1, -2))
            if keep is not None:  # through dropout: d(p) = d(dropped p) * keep / (1 - p)
                dp *= keep
                dp *= rescale
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # d(scores)
            del dp
            if keep is not None:
                p = p * keep * rescale  # what multiplied v
            if dk is None:
                assert s1 == S
                dv = torch.matmul(p.transpose(-1, -2), do)
                dk = torch.matmul(ds.transpose(-1, -2), qs[:, :, t0:t1])
            else:
                dv[:, :, :s1] += torch.matmul(p.transpose(-1, -2), do)
                dk[:, :, :s1] += torch.matmul(ds.transpose(-1, -2), qs[:, :, t0:t1])
            # d(q) = d(scores) k * scale: the scale goes into the GEMM (alpha) or into the copy
            # into d(q)'s rows, not into a separate pass.
            if len(spans) == 1:
                dq.view(n, T, D).baddbmm_(ds.view(n, T, S), k.view(n, S, D), beta=0.0,
                                          alpha=scale)
            else:
                torch.mul(torch.matmul(ds, k[:, :, :s1]), scale, out=dq[:, :, t0:t1])
            if need_bias:
                if dbias is None:
                    dbias = _sum_to(ds, bias_shape)
                else:
                    dbias[..., t0:t1, :s1] = _sum_to(ds, bias_shape)
        return dq, dk, dv, dbias, None, None, None
