"""Mamba: the chunked parallel scan and the recurrent step against a naive sequential scan;
hybrid attention/Mamba models generate with their cache exactly as by recomputation."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import DecoderLM, ModelConfig, generate
from lmlab.models.cache import LayerSSMCache
from lmlab.models.layers.mamba import MambaMixer
from lmlab.models.layers.selective_scan import selective_scan

TINY = dict(vocab_size=50, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, position="none")
ATOL = 1e-5


def naive_scan(u, dt, A, B, C, h=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t, one time step at a time."""
    batch, T, d = u.shape
    h = torch.zeros(batch, d, A.shape[1]) if h is None else h.clone()
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def naive_mixer(m: MambaMixer, x):
    """MambaMixer.forward written out token by token (conv window, scan, skip, gate)."""
    xs, z = m.in_proj(x).chunk(2, dim=-1)
    padded = F.pad(xs, (0, 0, m.d_conv - 1, 0))  # zeros before the first token
    weight = m.conv1d.weight[:, 0]  # [d_inner, d_conv]
    conv = torch.stack([(padded[:, t : t + m.d_conv].transpose(1, 2) * weight).sum(-1)
                        for t in range(x.shape[1])], 1) + m.conv1d.bias
    u = F.silu(conv)
    dt, B, C = m.x_proj(u).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(m.dt_proj(dt))
    y, _ = naive_scan(u, dt, -torch.exp(m.A_log), B, C)
    return m.out_proj((y + u * m.D) * F.silu(z))


def _scan_inputs(seed=0, batch=2, T=13, d=6, n=4, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, T, d, generator=g)
    dt = F.softplus(torch.randn(batch, T, d, generator=g)) * dt_scale
    A = -torch.rand(d, n, generator=g) * 4 - 0.1
    B = torch.randn(batch, T, n, generator=g)
    C = torch.randn(batch, T, n, generator=g)
    return u, dt, A, B, C


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_sequential_scan(chunk_size, with_state):
    u, dt, A, B, C = _scan_inputs()
    h0 = torch.randn(2, 6, 4) if with_state else None
    y, h = selective_scan(u, dt, A, B, C, h0, chunk_size=chunk_size)
    y_ref, h_ref = naive_scan(u, dt, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=ATOL, rtol=1e-5)


def test_scan_is_stable_for_strong_decay():
    # dt*|A| sums to thousands over a chunk: a factorised exp(-cumsum) form would overflow.
    u, dt, A, B, C = _scan_inputs(T=40, dt_scale=30.0)
    y, h = selective_scan(u, dt, A, B, C, chunk_size=32)
    y_ref, _ = naive_scan(u, dt, A, B, C)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def _mixer(seed=0, chunk_size=4):
    torch.manual_seed(seed)
    return MambaMixer(16, d_state=4, d_conv=3, expand=2, chunk_size=chunk_size).eval()


def test_mixer_equals_naive_token_by_token_forward():
    m = _mixer()
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(m(x), naive_mixer(m, x), atol=ATOL, rtol=1e-5)


def test_recurrent_steps_equal_parallel_forward():
    m = _mixer()
    x = torch.randn(2, 11, 16)
    full = m(x)
    cache = LayerSSMCache(2, m.d_inner, m.d_conv, m.d_state)
    pieces = [m(x[:, :5], cache=cache)]  # prefill through the scan, then O(1) steps
    pieces += [m(x[:, t : t + 1], cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=1e-5)
    step_only = LayerSSMCache(2, m.d_inner, m.d_conv, m.d_state)
    steps = torch.cat([m(x[:, t : t + 1], cache=step_only) for t in range(11)], 1)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=1e-5)


def test_left_pads_are_invisible():
    m = _mixer()
    x = torch.randn(1, 6, 16)
    padded = torch.cat([torch.randn(1, 3, 16), x], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(m(padded, mask)[:, 3:], m(x), atol=ATOL, rtol=1e-5)


def test_mamba_backward_reaches_every_parameter():
    m = _mixer().train()
    m(torch.randn(2, 9, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def _model(pattern, seed=0, **kw):
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY, "layer_pattern": pattern, "init_std": 0.2, **kw})
    return DecoderLM(config).eval()


def test_layer_pattern_builds_the_layers_it_names():
    model = _model("MMMA", n_layers=8)
    kinds = [layer.mixer_kind for layer in model.layers]
    assert kinds == ["mamba", "mamba", "mamba", "attention"] * 2
    assert hasattr(model.layers[0], "mamba") and hasattr(model.layers[3], "attn")
    cache = model.new_cache(1, 8)
    assert cache.keys[0] is None and cache.keys[3] is not None
    assert isinstance(cache.layers[0], LayerSSMCache)


@pytest.mark.parametrize("pattern,extra", [("MMMA", {}), ("MA", {"position": "rope"}),
                                           ("M", {}), ("MA", {"ffn": "moe", "moe_every": 2})])
def test_hybrid_cached_logits_equal_full_forward(pattern, extra):
    model = _model(pattern, **extra)
    ids = torch.randint(0, 50, (2, 10))
    full = model(ids)
    cache = model.new_cache(2, 10)
    pieces = [model(ids[:, :4], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["MMMA", "M"])
def test_hybrid_generation_equals_recomputation_with_left_padding(pattern, left_pad):
    model = _model(pattern)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(prompts)
    cached = generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=6, use_cache=False))
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=6)
        assert torch.equal(cached[row], alone[0]), (row, cached[row], alone[0])


def test_cache_reset_clears_the_recurrent_state():
    model = _model("MA")
    ids = torch.randint(0, 50, (1, 5))
    cache = model.new_cache(1, 10)
    first = model(ids, cache=cache)
    cache.reset()
    torch.testing.assert_close(model(ids, cache=cache), first)


@pytest.mark.parametrize("chunk_size", [2, 5, 64])
def test_scan_gradients(chunk_size):
    """The hand-written backward against finite differences (float64) and against autograd
    through the sequential scan."""
    u, dt, A, B, C = (x.double().requires_grad_() for x in _scan_inputs(T=7, d=3, n=2))
    h0 = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, chunk_size=chunk_size), (u, dt, A, B, C, h0))
    inputs = [x.detach().float().requires_grad_() for x in (u, dt, A, B, C, h0)]
    y, h = selective_scan(*inputs, chunk_size=chunk_size)
    grads = torch.autograd.grad((y.sin().sum() + h.square().sum()), inputs)
    ref_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    y_ref, h_ref = naive_scan(*ref_inputs)
    ref = torch.autograd.grad((y_ref.sin().sum() + h_ref.square().sum()), ref_inputs)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
