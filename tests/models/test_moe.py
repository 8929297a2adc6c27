"""Mixture of experts: routing against naive per-token references, capacity, losses, accounting."""

import pytest
import torch

from lmlab.models import DecoderLM, ModelConfig
from lmlab.models.layers.ffn import FeedForward
from lmlab.models.layers.moe import (
    MoEFeedForward,
    expert_capacity,
    load_balancing_loss,
    route_expert_choice,
    route_top_k,
    router_z_loss,
)

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def _moe(seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoEFeedForward(16, 24, **{"kind": "gelu", "n_experts": 4, "top_k": 2, **kw})
    # Larger router weights spread the probabilities, so top-k choices are not near-ties.
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    return layer.eval()


def _naive_top_k(layer: MoEFeedForward, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """One token at a time: softmax, top-k, renormalise (k > 1), weighted sum of experts."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(layer.router(x[n]).float(), dim=-1)
        gates, experts = probs.topk(top_k)
        if top_k > 1:
            gates = gates / gates.sum()
        for g, e in zip(gates, experts):
            out[n] += g * layer.experts[int(e)](x[n][None])[0]
    return out


def test_one_expert_equals_dense_ffn():
    dense = FeedForward(16, 24, "swiglu")
    moe = MoEFeedForward(16, 24, "swiglu", n_experts=1, top_k=1, capacity_factor=None)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=0)


def test_one_expert_decoder_equals_dense_decoder():
    torch.manual_seed(0)
    dense = DecoderLM(ModelConfig(**TINY, ffn="gelu")).eval()
    moe = DecoderLM(ModelConfig(**TINY, ffn="moe", expert_ffn="gelu", n_experts=1, top_k=1)).eval()
    state = {k.replace(".ffn.", ".ffn.experts.0."): v for k, v in dense.state_dict().items()}
    state.update({k: v for k, v in moe.state_dict().items() if "router" in k})
    moe.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(moe(ids), dense(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_top_k_routing_equals_per_token_loop(top_k, kind):
    layer = _moe(top_k=top_k, kind=kind)
    x = torch.randn(2, 6, 16)
    expected = _naive_top_k(layer, x.reshape(-1, 16), top_k).view_as(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("router", "capacity_factor"), [
    ("topk", None), ("topk", 1.0), ("topk", 0.5), ("expert_choice", 1.0), ("expert_choice", 0.5)])
@pytest.mark.parametrize("gpu_dispatch", [False, True], ids=["gather", "gpu-dispatch"])
def test_masked_tokens_are_not_routed_and_do_not_change_the_others(router, capacity_factor,
                                                                   gpu_dispatch):
    # 8 positions, 5 real: a capacity counts the real tokens (factor 1, top-2, 4 experts: 3,
    # where all 8 positions would give 4), so the padded batch routes as the real tokens alone.
    # With a GPU's dispatch (buffers, or grouped GEMMs without a capacity) that count stays on
    # the device.
    layer = _moe(top_k=2, router=router, capacity_factor=capacity_factor)
    layer.gpu_dispatch_on_cpu = gpu_dispatch
    x = torch.randn(1, 8, 16)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    out = layer(x, mask)
    assert torch.equal(out[0, :3], torch.zeros(3, 16))
    torch.testing.assert_close(out[:, 3:], layer(x[:, 3:]), atol=1e-6, rtol=0)
    assert layer.last_load.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(("router", "capacity_factor"), [("topk", 2.0), ("topk", 0.5), ("expert_choice", 1.0)])
def test_capacity_buffers_equal_the_per_expert_gather(router, capacity_factor):
    # One routing, dispatched both ways: fixed-size buffers (no host read) and the dropless
    # path's exact per-expert gather must give the same outputs and gradients, drops or not.
    layer = _moe(router=router, top_k=2, capacity_factor=capacity_factor).train()
    x = torch.randn(12, 16, requires_grad=True)
    probs = torch.softmax(layer.router(x).float(), dim=-1)
    slots = expert_capacity(12, 4, 2, capacity_factor)
    if router == "topk":
        routing = route_top_k(probs, 2, slots)[0]
    else:  # a capacity counted on the device, below the buffer's rows
        routing = route_expert_choice(probs, torch.tensor(slots - 2), slots=slots)
    assert not routing.keep.all() or capacity_factor == 2.0
    results = []
    for dispatch in (lambda: layer._dispatch_slots(x, routing, slots), lambda: layer._dispatch_gather(x, routing)):
        out = dispatch()
        out.square().sum().backward(retain_graph=True)
        results.append((out.detach(), x.grad.clone(), layer.experts[1].up_proj.weight.grad.clone()))
        x.grad = None
        layer.zero_grad()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_gemms_equal_the_per_expert_gather(kind, bias, top_k):
    # Dropless routing dispatched both ways, with masked tokens (they join the last group as
    # zero rows with a zero gate, whatever the pad positions hold: inf here): the same outputs
    # and gradients for the input and every parameter, router included.
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 24, kind, n_experts=4, top_k=top_k, bias=bias).train()
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(20, 16, requires_grad=True)  # torch's grouped kernel has no float64
    mask = torch.ones(20, dtype=torch.bool)
    mask[15:] = False
    routing = route_top_k(torch.softmax(layer.router(x).float(), dim=-1), top_k, None, mask)[0]
    x = torch.cat([x[:15], torch.full((5, 16), float("inf"))])
    assert layer._grouped_experts()
    results = []
    for dispatch in (layer._dispatch_grouped, layer._dispatch_gather):
        out = dispatch(x, routing)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()],
                                    retain_graph=True)
        results.append((out.detach(), *grads))
    assert all(torch.isfinite(t).all() for t in results[0])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(results[0][0][15:], torch.zeros(5, 16))


def test_grouped_gemms_under_autocast_run_in_its_dtype():
    layer = _moe(capacity_factor=None).train()
    layer.gpu_dispatch_on_cpu = True
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = layer._dispatch_gather(x.view(-1, 16), route_top_k(
            torch.softmax(layer.router(x.view(-1, 16)).float(), dim=-1), 2)[0]).view_as(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["grouped", "buffers"])
def test_the_gpu_dispatch_compiles_without_a_graph_break(capacity_factor):
    """fullgraph=True: dropless routing's grouped GEMMs (bf16: the op's shape rule takes bf16
    only) and a capacity's buffers trace whole, padded batch included."""
    layer = _moe(capacity_factor=capacity_factor, kind="swiglu").train()
    layer.gpu_dispatch_on_cpu = True
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])

    def loss(x, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, mask)
        return out.float().square().sum() + layer.last_aux_loss

    torch._dynamo.reset()
    try:
        got = torch.compile(loss, fullgraph=True)(x, mask)
        got_grads = torch.autograd.grad(got, [x, *layer.parameters()])
    finally:
        torch._dynamo.reset()
    want = loss(x, mask)
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dropless_routing_on_a_gpu_equals_the_gather():
    """On a Hopper GPU dropless routing takes torch's grouped bf16 kernel, with the gather's
    outputs and gradients (to bf16 rounding), padded positions holding inf included, and an
    expert without tokens gets an exactly zero gradient (pytorch#172439 saw garbage there on
    a B200)."""
    from lmlab.models.layers.moe import _grouped_kernel_on

    torch.manual_seed(0)
    layer = MoEFeedForward(64, 128, "swiglu", n_experts=4, top_k=2).cuda().train()
    x = torch.randn(256, 64, device="cuda")
    x[-8:] = float("inf")  # padded positions
    x.requires_grad_()
    mask = torch.ones(256, dtype=torch.bool, device="cuda")
    mask[-8:] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if not _grouped_kernel_on(x.device):
            assert not layer._grouped(x)
            pytest.skip("not a Hopper GPU: dropless routing gathers here")
        assert layer._grouped(x)
        probs = torch.softmax(layer.router(torch.where(mask[:, None], x, 0)).float(), dim=-1)
        probs = probs.detach().clone()
        probs[:, 3] = 0.0  # expert 3 never chosen
        routing = route_top_k(probs, 2, None, mask)[0]
        results = []
        for dispatch in (layer._dispatch_grouped, layer._dispatch_gather):
            out = dispatch(x, routing)
            params = list(layer.experts.parameters())
            grads = torch.autograd.grad(out[:-8].float().square().sum(), [x, *params])
            results.append((out.float(), grads[0][:-8], *grads[1:]))
    assert torch.isfinite(results[0][0]).all() and not results[0][0][-8:].any()
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3
    unused = len(list(layer.experts[3].parameters()))  # the last expert's, listed last
    assert not any(g.any() for g in results[0][-unused:])


def test_adapted_experts_take_the_gather():
    from peft import LoraConfig, inject_adapter_in_model

    layer = _moe(capacity_factor=None)
    assert layer._grouped_experts()
    handle = layer.experts[1].register_forward_hook(lambda module, args, out: out)
    assert not layer._grouped_experts()  # a hook on an expert would be bypassed
    handle.remove()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["up_proj"]), layer)
    assert not layer._grouped_experts()
    layer.gpu_dispatch_on_cpu = True
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(layer(x), _naive_top_k(layer, x.view(-1, 16), 2).view_as(x),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("router", "capacity_factor", "padded"), [
    ("topk", 1.25, False), ("topk", 1.25, True), ("expert_choice", None, False),
    ("expert_choice", 1.0, True)])
def test_routing_with_a_capacity_never_waits_for_the_device(router, capacity_factor, padded):
    from tests.host_syncs import HostSyncs

    layer = _moe(router=router, capacity_factor=capacity_factor).train()
    layer.gpu_dispatch_on_cpu = True  # the GPU's dispatch (a CPU gathers exactly, where reads are free)
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]) if padded else None
    with HostSyncs() as syncs:
        out = layer(x, mask)
        (out.sum() + layer.last_aux_loss + layer.last_z_loss).backward()
        layer.last_load.sum()
    assert not syncs.found, syncs.report()


def test_dropless_routing_reads_the_counts_once_per_layer_on_a_cpu_only():
    from tests.host_syncs import HostSyncs

    layer = _moe(capacity_factor=None).train()
    with HostSyncs() as syncs:
        layer(torch.randn(2, 6, 16, requires_grad=True)).sum().backward()
    assert [op for op, _ in syncs.found] == ["Tensor.tolist"] and sum(syncs.found.values()) == 1
    layer.gpu_dispatch_on_cpu = True  # grouped GEMMs, padded batch included
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with HostSyncs() as syncs:
        out = layer(torch.randn(2, 6, 16, requires_grad=True), mask)
        (out.sum() + layer.last_aux_loss + layer.last_z_loss).backward()
    assert not syncs.found, syncs.report()


def test_capacity_drops_exactly_the_overflow():
    # Six tokens, two experts, top-1: tokens 0, 1, 3, 5 pick expert 0; capacity 2 keeps the
    # first two of them; expert 1 (tokens 2, 4) has room.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    token, expert, gate = route_top_k(probs, top_k=1, capacity=2)[0].kept()
    assert sorted(zip(token.tolist(), expert.tolist())) == [(0, 0), (1, 0), (2, 1), (4, 1)]
    torch.testing.assert_close(gate, probs[token, expert])

    # Top-2: every first choice queues before any second choice.
    token, expert, _ = route_top_k(probs, top_k=2, capacity=3)[0].kept()
    kept = sorted(zip(token.tolist(), expert.tolist()))
    # Expert 0: first choices 0, 1, 3 fill it (5 dropped); expert 1: first choices 2, 4, then
    # the second choice of token 0.
    assert kept == [(0, 0), (0, 1), (1, 0), (2, 1), (3, 0), (4, 1)]


def test_dropped_tokens_pass_through_as_zero_ffn_output():
    layer = _moe(top_k=1, n_experts=2, capacity_factor=0.5)  # capacity = ceil(0.5*8/2) = 2
    x = torch.randn(8, 16)
    probs = torch.softmax(layer.router(x), dim=-1)
    token, _, _ = route_top_k(probs, 1, capacity=2)[0].kept()
    out = layer(x)
    dropped = sorted(set(range(8)) - set(token.tolist()))
    assert len(token) == 4 and len(dropped) == 4
    assert torch.equal(out[dropped], torch.zeros(4, 16))
    kept = token.tolist()
    torch.testing.assert_close(out[kept], _naive_top_k(layer, x, 1)[kept], atol=1e-5, rtol=0)


def test_aux_and_z_loss_equal_their_formulas_on_hand_made_router_output():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.5]])
    probs = logits.softmax(-1)
    chosen = torch.tensor([[0], [1], [2], [1]])
    # f = (1/4, 2/4, 1/4); P = mean probability per expert; loss = 3 * sum f * P.
    f = torch.tensor([0.25, 0.5, 0.25])
    expected = 3 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, chosen), expected)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())
    # Masked tokens are left out of both.
    mask = torch.tensor([1, 1, 0, 1])
    f_masked = torch.tensor([1 / 3, 2 / 3, 0.0])
    expected = 3 * (f_masked * probs[[0, 1, 3]].mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, chosen, mask), expected)
    uniform = torch.full((4, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0]])).item() == pytest.approx(1.0)


def test_expert_choice_picks_each_experts_top_c():
    torch.manual_seed(1)
    probs = torch.randn(10, 4).softmax(-1)
    token, expert, gate = route_expert_choice(probs, capacity=3).kept()
    for e in range(4):
        picked = sorted(token[expert == e].tolist())
        assert picked == sorted(probs[:, e].topk(3).indices.tolist())
    torch.testing.assert_close(gate, probs[token, expert])
    # Pads are never picked, even when the capacity exceeds the real tokens.
    mask = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    token, _, _ = route_expert_choice(probs, capacity=5, token_mask=mask).kept()
    assert set(token.tolist()) <= {0, 1}


def test_expert_choice_layer_equals_naive_reference():
    layer = _moe(router="expert_choice", top_k=1, n_experts=4, capacity_factor=1.0)
    x = torch.randn(12, 16)  # capacity = ceil(1 * 1 * 12 / 4) = 3 per expert
    probs = torch.softmax(layer.router(x), dim=-1)
    expected = torch.zeros_like(x)
    for e in range(4):
        for t in probs[:, e].topk(3).indices.tolist():
            expected[t] += probs[t, e] * layer.experts[e](x[t][None])[0]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_backbone_exposes_weighted_losses_and_load():
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, "n_layers": 4}, ffn="moe", n_experts=4, top_k=2, moe_every=2,
                         aux_loss_weight=0.5, z_loss_weight=0.25)
    model = DecoderLM(config)
    assert [type(layer.ffn).__name__ for layer in model.layers] == [
        "FeedForward", "MoEFeedForward", "FeedForward", "MoEFeedForward"]
    assert model.auxiliary_losses() == {} and model.expert_load() is None
    ids = torch.randint(0, 50, (2, 9))
    logits = model(ids)
    losses = model.auxiliary_losses()
    assert set(losses) == {"moe/aux_loss", "moe/z_loss"}
    raw = torch.stack([model.layers[i].ffn.last_aux_loss for i in (1, 3)]).mean()
    torch.testing.assert_close(losses["moe/aux_loss"], raw)
    assert losses["moe/aux_loss"].item() >= 0.5 * 0.99  # the balancing loss is >= 1 (weighted 0.5)
    load = model.expert_load()
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(-1), torch.ones(2))
    (logits.logsumexp(-1).mean() + sum(losses.values())).backward()
    assert model.layers[1].ffn.router.weight.grad.abs().sum() > 0
    # Dense models report nothing.
    dense = DecoderLM(ModelConfig(**TINY))
    dense(ids)
    assert dense.auxiliary_losses() == {} and dense.expert_load() is None


def test_moe_cached_generation_equals_recomputation(left_pad):
    from lmlab.models import generate

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**TINY, ffn="moe", n_experts=4, top_k=2, init_std=0.2)).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12]])
    cached = generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=6, use_cache=False))
    alone = generate(model, torch.tensor([[11, 12]]), max_new_tokens=6)
    assert torch.equal(cached[1], alone[0])

