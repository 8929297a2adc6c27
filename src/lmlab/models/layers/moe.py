"""Mixture-of-experts FFN: a router sends each token to a few expert FFNs.

Token choice (`router="topk"`): every token takes its top_k experts (1 = Switch, 2 =
Mixtral, whose top-k gates are renormalised to sum to 1). With a capacity, each expert takes
at most `capacity` assignments; the overflow is dropped and a token that loses all its
experts passes through the residual connection only. Expert choice (`router="expert_choice"`,
Zhou et al. 2022): every expert takes its top-C tokens, which balances load by construction
but lets a token's routing depend on later tokens of the batch, so it is not causal.

Routing is vectorised. With a capacity (any capacity_factor, and always under expert choice)
every expert runs on a fixed-size buffer, so a training step never waits for the GPU here.
Dropless routing in bf16 on a Hopper GPU (H100, H200: torch's grouped GEMM kernel) runs every
expert in one grouped GEMM per projection (`torch._grouped_mm`, assignments sorted by expert,
the groups' ends counted on the device), so it reads nothing to the host either. Elsewhere
dropless routing gathers each expert's tokens and loops over the experts (`_dispatch_gather`),
reading the per-expert counts to the host once per layer: a sync on a GPU; on a CPU the read
costs nothing and the gather was faster than the grouped form there (0.92-0.96x at B·T 2,048,
d 384, 8 experts, top-2, fp32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.layers.ffn import FeedForward
from lmlab.models.layers.fused_projection import plain_linear

ROUTERS = ("topk", "expert_choice")


def expert_capacity(n_tokens: int | Tensor, n_experts: int, top_k: int,
                    capacity_factor: float | None) -> int | Tensor | None:
    """Assignments one expert may take: factor * top_k * tokens / experts (GShard), rounded up.

    None (dropless) for token choice without a factor; expert choice always needs a capacity
    and reads a missing factor as 1 (each token gets top_k experts on average). A tensor
    `n_tokens` (the real tokens of a padded batch, counted on the device) gives a tensor, with
    Python's float64 arithmetic, so that nothing is read to the host.
    """
    if capacity_factor is None:
        return None
    if isinstance(n_tokens, Tensor):
        return (n_tokens.double() * (capacity_factor * top_k) / n_experts).ceil().clamp(min=1).long()
    return max(1, math.ceil(capacity_factor * top_k * n_tokens / n_experts))


class Routing(NamedTuple):
    """Routing decisions as fixed-shape flat tensors over every candidate assignment, so that
    routing and dispatch never size a tensor by the data (a host-device sync on a GPU).

    Assignment i would send `token[i]` to `expert[i]` with weight `gate[i]`; it happens only
    where `keep[i]`. `slot[i]` is its row in that expert's capacity buffer (None: dropless).
    """

    token: Tensor
    expert: Tensor
    gate: Tensor
    keep: Tensor
    slot: Tensor | None

    def kept(self) -> tuple[Tensor, Tensor, Tensor]:
        """(token, expert, gate) of the kept assignments only: for inspection; boolean
        indexing reads the count to the host."""
        return self.token[self.keep], self.expert[self.keep], self.gate[self.keep]


def route_top_k(
    probs: Tensor,
    top_k: int,
    capacity: int | Tensor | None = None,
    token_mask: Tensor | None = None,
) -> tuple[Routing, Tensor]:
    """Token choice over router probabilities [N, E].

    Returns the routing of the N * top_k (token, choice) assignments, token-major, plus every
    token's chosen experts [N, top_k] before dropping (what the balancing loss measures).
    Queue order for capacity: all first choices before any second choice (GShard), and within
    one choice rank earlier tokens of the flattened batch first. Masked tokens are not routed.
    """
    N, E = probs.shape
    gate, chosen = probs.topk(top_k, dim=-1)  # [N, k]
    if top_k > 1:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    keep = torch.ones_like(chosen, dtype=torch.bool)
    if token_mask is not None:
        keep = keep & token_mask.bool()[:, None]
    position = None
    if capacity is not None:
        claims = F.one_hot(chosen.T, E) * keep.T[..., None]  # [k, N, E], choice-major
        queue = claims.flatten(0, 1).cumsum(0).view(top_k, N, E) - 1
        position = queue.gather(-1, chosen.T[..., None]).squeeze(-1).T  # [N, k]
        keep = keep & (position < capacity)
        position = position.flatten()
    token = torch.arange(N, device=probs.device)[:, None].expand(N, top_k)
    routing = Routing(token.flatten(), chosen.flatten(), gate.flatten(), keep.flatten(), position)
    return routing, chosen


def route_expert_choice(
    probs: Tensor,
    capacity: int | Tensor,
    token_mask: Tensor | None = None,
    slots: int | None = None,
) -> Routing:
    """Expert choice: expert e takes the `capacity` tokens with the highest probs[:, e].

    Returns the routing of `slots` (default: capacity, at most N) candidates per expert,
    expert-major, each expert's in descending order. Masked tokens score below any
    probability, so they are picked only when capacity exceeds the real tokens, and those
    picks are not kept. `slots` >= capacity lets a capacity counted on the device (a padded
    batch's real tokens) select from a buffer whose size is known on the host.
    """
    N, E = probs.shape
    if slots is None:
        slots = int(capacity)
    slots = min(slots, N)
    scores = probs if token_mask is None else probs.masked_fill(~token_mask.bool()[:, None], -1.0)
    gate, token = scores.T.topk(slots, dim=-1)  # [E, slots]
    expert = torch.arange(E, device=probs.device)[:, None].expand_as(token)
    rank = torch.arange(slots, device=probs.device).expand_as(token)
    keep = (gate >= 0) & (rank < capacity)
    return Routing(token.flatten(), expert.flatten(), gate.flatten(), keep.flatten(), rank.flatten())


def _token_weights(n: int, token_mask: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    weights = (torch.ones(n, device=device) if token_mask is None
               else token_mask.reshape(-1).to(torch.float32))
    return weights, weights.sum().clamp(min=1.0)


def expert_fractions(chosen: Tensor, n_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """f_e: the fraction of (token, choice) assignments that picked expert e; sums to 1."""
    weights, n = _token_weights(chosen.shape[0], token_mask, chosen.device)
    counts = F.one_hot(chosen, n_experts).to(torch.float32).sum(dim=1)  # [N, E]
    return (counts * weights[:, None]).sum(0) / (n * chosen.shape[1])


def load_balancing_loss(probs: Tensor, chosen: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Switch Transformer auxiliary loss n_experts * sum_e f_e * P_e.

    f_e (`expert_fractions`) is not differentiable; P_e, the mean router probability of e,
    carries the gradient. It is 1 for perfectly uniform routing.
    """
    n_experts = probs.shape[-1]
    weights, n = _token_weights(probs.shape[0], token_mask, probs.device)
    mean_prob = (probs.float() * weights[:, None]).sum(0) / n
    return n_experts * (expert_fractions(chosen, n_experts, token_mask) * mean_prob).sum()


def router_z_loss(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2 (keeps logits small)."""
    weights, n = _token_weights(logits.shape[0], token_mask, logits.device)
    return (torch.logsumexp(logits.float(), dim=-1).square() * weights).sum() / n


class MoEFeedForward(nn.Module):
    """Drop-in replacement for `FeedForward`: experts `experts.{i}`, router Linear `router`.

    After each forward, `last_aux_loss` / `last_z_loss` hold the weighted losses and
    `last_load` the per-expert fraction of routing decisions (see `collect_auxiliary_losses`).

    With a capacity, a GPU (or a compiled forward) dispatches through fixed-size expert buffers
    that never wait for the device; without one, in bf16 on a Hopper GPU, through grouped
    GEMMs (`_grouped`: plain experts only, adapted, quantised or hooked ones gather). A CPU,
    where reading the counts costs nothing, gathers each expert's kept tokens exactly instead
    and skips the buffers' empty rows (a layer's fwd+bwd at B 8 x T 256, d 384, 8 experts,
    top-2, factor 1.25: 150 vs 211 ms). `gpu_dispatch_on_cpu = True` makes a CPU dispatch as a GPU does
    (tests); every dispatch gives the same outputs for the same routing, up to rounding.
    """

    gpu_dispatch_on_cpu = False

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        kind: str = "gelu",
        n_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = None,
        router: str = "topk",
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        bias: bool = True,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r} (valid: {', '.join(ROUTERS)})")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts={n_experts}, got {top_k}")
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router_kind = router
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff, kind, bias) for _ in range(n_experts))
        self.last_aux_loss: Tensor | None = None
        self.last_z_loss: Tensor | None = None
        self.last_load: Tensor | None = None

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """x [..., d_model]; token_mask [...] (1 = real token) keeps pads out of routing."""
        flat = x.reshape(-1, x.shape[-1])
        N = flat.shape[0]
        mask = None if token_mask is None else token_mask.reshape(-1).bool()
        # Routing in float32: softmax/top-k ties in bf16 would make routing noisy.
        logits = self.router(flat).float()
        probs = logits.softmax(dim=-1)
        # The capacity buffers are sized for every position (known on the host); a padded
        # batch's capacity counts its real tokens, on the device, and limits the buffer's use.
        n_real = N if mask is None else mask.sum()
        factor = self.capacity_factor
        if self.router_kind == "topk":
            slots = expert_capacity(N, self.n_experts, self.top_k, factor)
            capacity = expert_capacity(n_real, self.n_experts, self.top_k, factor)
            routing, chosen = route_top_k(probs, self.top_k, capacity, mask)
            aux = load_balancing_loss(probs, chosen, mask)
            load = expert_fractions(chosen, self.n_experts, mask)
        else:
            factor = 1.0 if factor is None else factor
            slots = min(expert_capacity(N, self.n_experts, self.top_k, factor), N)
            capacity = expert_capacity(n_real, self.n_experts, self.top_k, factor)
            routing = route_expert_choice(probs, capacity, mask, slots)
            aux = probs.new_zeros(())  # balanced by construction
            counts = routing.keep.view(self.n_experts, slots).sum(-1).to(torch.float32)
            load = counts / counts.sum().clamp(min=1.0)

        self.last_aux_loss = self.aux_loss_weight * aux
        self.last_z_loss = self.z_loss_weight * router_z_loss(logits, mask)
        self.last_load = load.detach()
        gathers = (flat.device.type == "cpu" and not self.gpu_dispatch_on_cpu
                   and not torch.compiler.is_compiling())
        if routing.slot is None:
            if self._grouped(flat):
                return self._dispatch_grouped(flat, routing).view_as(x)
            return self._dispatch_gather(flat, routing).view_as(x)
        if gathers:
            return self._dispatch_gather(flat, routing).view_as(x)
        return self._dispatch_slots(flat, routing, slots).view_as(x)

    def _product_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the experts' nn.Linear calls would multiply in: autocast's, else the
        weights'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.experts[0].up_proj.weight.dtype

    def _grouped(self, x: Tensor) -> bool:
        """Whether dropless routing takes `_dispatch_grouped`: on a GPU where torch's grouped
        kernel runs (bf16, compute capability 9, dimensions that keep its rows 16-byte aligned;
        elsewhere torch would fall back to reading the groups' ends and looping, which the
        gather does too), plain experts only. On a CPU only with `gpu_dispatch_on_cpu`
        (tests), and in bf16 under torch.compile (its shape rule for the op takes bf16 only)."""
        if not self._grouped_experts():
            return False
        dtype = self._product_dtype(x)
        if x.device.type == "cpu":  # the CPU kernel: fp32 or bf16, bf16 only under compile
            return self.gpu_dispatch_on_cpu and (dtype == torch.bfloat16 or (
                dtype == torch.float32 and not torch.compiler.is_compiling()))
        expert = self.experts[0]
        return (x.is_cuda and dtype == torch.bfloat16 and _grouped_kernel_on(x.device)
                and expert.up_proj.in_features % 8 == 0 and expert.up_proj.out_features % 8 == 0)

    def _grouped_experts(self) -> bool:
        """Whether `_dispatch_grouped` computes what the experts would: unhooked plain
        `FeedForward`s of plain `nn.Linear`s with weights of one shape, dtype and device
        (stacked weights would bypass an adapter, a quantised layer or a hook)."""
        return all(
            type(e) is FeedForward and not e._forward_hooks and not e._forward_pre_hooks
            and "forward" not in e.__dict__ and all(plain_linear(m) for m in e.children())
            for e in self.experts) and len({
                tuple((m.weight.shape, m.weight.dtype, m.weight.device, m.bias is None)
                      for m in e.children()) for e in self.experts}) == 1

    def _dispatch_grouped(self, x: Tensor, routing: Routing) -> Tensor:
        """Dropless routing without a host read: the assignments sorted by expert, each
        projection one `torch._grouped_mm` over the experts' stacked weights, the groups' ends
        counted on the device. Unkept assignments (masked tokens) join the last group as zero
        rows with a zero gate: every row of a grouped product is then computed (rows past the
        last end would be left uninitialised, forward and backward) and finite whatever a pad
        position holds, and none of them is read back."""
        E = self.n_experts
        group = torch.where(routing.keep, routing.expert, E - 1)
        order = group.argsort(stable=True)
        token, group, kept = routing.token[order], group[order], routing.keep[order]
        gate = torch.where(routing.keep, routing.gate, 0)[order]  # where: a pad's gate may be nan
        ends = (torch.zeros(E, dtype=torch.long, device=x.device)
                .scatter_add_(0, group, torch.ones_like(group)).cumsum(0).to(torch.int32))
        # torch's grouped kernel is not on autocast's lists: the products take autocast's
        # dtype here, as the experts' nn.Linear calls would.
        dtype = self._product_dtype(x)
        kind = self.experts[0].kind

        def product(rows: Tensor, name: str) -> Tensor:
            layers = [getattr(e, name) for e in self.experts]
            # [E, d_in, d_out] as a transposed view of the stacked [E, d_out, d_in] weights:
            # the column-major layout the grouped kernel takes.
            weight = torch.stack([m.weight.to(dtype) for m in layers]).transpose(1, 2)
            out = torch._grouped_mm(rows, weight, offs=ends)
            if layers[0].bias is not None:
                out = out + torch.stack([m.bias.to(dtype) for m in layers])[group]
            return out

        with torch.autocast(x.device.type, enabled=False):
            rows = torch.where(kept[:, None], x[token], 0).to(dtype)
            up = product(rows, "up_proj")
            if kind == "swiglu":
                hidden = F.silu(product(rows, "gate_proj")) * up
            else:
                hidden = F.relu(up) if kind == "relu" else F.gelu(up)
            y = product(hidden, "down_proj")
        return x.new_zeros(x.shape, dtype=y.dtype).index_add_(0, token,
                                                              y * gate[:, None].to(y.dtype))

    def _dispatch_slots(self, x: Tensor, routing: Routing, slots: int) -> Tensor:
        """Each expert runs on a buffer of `slots` rows (GShard): the kept assignments fill
        theirs, the rest hold zeros and are never read back. Every shape is known on the
        host, so nothing waits for the device; the price is computing the empty rows."""
        N, d = x.shape
        E = self.n_experts
        spare = E * slots  # where assignments that are not kept go, never read
        row = torch.where(routing.keep, routing.expert * slots + routing.slot, spare)
        source = torch.full((spare + 1,), N, dtype=torch.long, device=x.device)
        source.scatter_(0, row, routing.token)  # the token in each buffer row; N: a zero row
        buffer = torch.cat([x, x.new_zeros(1, d)])[source[:spare]].view(E, slots, d)
        y = torch.cat([expert(buffer[e]) for e, expert in enumerate(self.experts)])
        y = torch.cat([y, y.new_zeros(1, d)])  # the spare row reads zeros
        weighted = y[row] * (routing.gate * routing.keep)[:, None].to(y.dtype)
        if self.router_kind == "topk":  # token-major, top_k per token: a plain sum, no atomics
            return weighted.view(N, self.top_k, d).sum(1)
        return y.new_zeros(N, d).index_add_(0, routing.token, weighted)

    def _dispatch_gather(self, x: Tensor, routing: Routing) -> Tensor:
        """Each expert runs on exactly its kept tokens: the per-expert counts are read to the
        host. Dropless routing's dispatch (one sync per layer on a GPU, the price of dropping
        nothing), and a CPU's with a capacity, where the read costs nothing."""
        E = self.n_experts
        group = torch.where(routing.keep, routing.expert, E)  # unrouted (masked) tokens: group E
        order = group.argsort(stable=True)
        token, gate = routing.token[order], routing.gate[order]
        counts = torch.zeros(E + 1, dtype=torch.long, device=x.device)
        counts = counts.scatter_add_(0, group, torch.ones_like(group)).tolist()
        out: Tensor | None = None
        # Every expert runs, even on zero tokens, so all of them are in the autograd graph
        # (DDP without find_unused_parameters requires it).
        for e, (idx, g) in enumerate(zip(token.split(counts)[:E], gate.split(counts)[:E])):
            y = self.experts[e](x[idx])
            if out is None:  # the experts' dtype, which autocast may make differ from x's
                out = x.new_zeros(x.shape, dtype=y.dtype)
            out.index_add_(0, idx, y * g[:, None].to(y.dtype))
        return out


@torch.compiler.assume_constant_result
def _grouped_kernel_on(device: torch.device) -> bool:
    """Whether torch has its grouped bf16 GEMM kernel for this CUDA device and lmlab takes it:
    Hopper (compute capability 9.x). torch also has one for Blackwell (10.x), left out until
    checked there: pytorch#172439 reports garbage weight gradients for experts without tokens
    on a B200."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] == 9


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def collect_auxiliary_losses(model: nn.Module) -> dict[str, Tensor]:
    """The weighted MoE losses of the model's last forward, averaged over its MoE layers (so
    a weight means the same whatever `moe_every` and the depth); {} without MoE layers."""
    layers = [m for m in moe_layers(model) if m.last_aux_loss is not None]
    if not layers:
        return {}
    return {
        "moe/aux_loss": torch.stack([m.last_aux_loss for m in layers]).mean(),
        "moe/z_loss": torch.stack([m.last_z_loss for m in layers]).mean(),
    }


def collect_expert_load(model: nn.Module) -> Tensor | None:
    """[n_moe_layers, n_experts]: per layer, the fraction of routing decisions per expert."""
    loads = [m.last_load for m in moe_layers(model) if m.last_load is not None]
    return torch.stack(loads) if loads else None
