"""lmlab's RMSNorm: its written CPU training pass against a naive fp64 reference and torch's
`nn.RMSNorm`, and when it is (not) taken."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.models.layers.norm import build_norm
from lmlab.models.layers.rms_norm import RMSNorm, _RMSNormFunction, uses_written_pass


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _norm(dim: int, eps: float | None = 1e-6, dtype=torch.float32) -> RMSNorm:
    torch.manual_seed(0)
    norm = RMSNorm(dim, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


def _written(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "_RMSNormFunctionBackward"


@pytest.mark.parametrize("shape", [(16,), (7, 16), (2, 5, 24), (2, 3, 5, 8)])
@pytest.mark.parametrize("eps", [1e-6, None])
def test_values_and_gradients_equal_a_naive_reference(shape, eps):
    norm = _norm(shape[-1], eps)
    x = (torch.randn(shape) * 3).requires_grad_()
    grad_out = torch.randn(shape)
    out = norm(x)
    assert _written(out)
    out.backward(grad_out)

    x_ref = x.detach().double().requires_grad_()
    w_ref = norm.weight.detach().double().requires_grad_()
    ref = naive_rms_norm(x_ref, w_ref, eps if eps is not None else torch.finfo(torch.float32).eps)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # torch's kernel, so an output never depends on autograd recording
        assert torch.equal(out, norm(x))
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-4)


def test_gradcheck_in_fp64():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-5), (x, weight))
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, None), (x, weight))


def test_equals_torch_rms_norm_on_a_strided_view():
    # QK-norm normalises [B, H, T, D] views of the projection's [B, T, H, D] output.
    norm = _norm(8)
    torch_norm = nn.RMSNorm(8, eps=1e-6)
    torch_norm.load_state_dict(norm.state_dict())
    base = torch.randn(2, 5, 3, 8)
    grad_out = torch.randn(2, 3, 5, 8)
    grads = []
    for module in (norm, torch_norm):
        x = base.clone().requires_grad_()
        out = module(x.transpose(1, 2))
        assert _written(out) is (module is norm)
        out.backward(grad_out)
        grads.append((out.detach(), x.grad, module.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    for ours, theirs in zip(grads[0][1:], grads[1][1:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_frozen_weight_or_a_constant_input_gets_only_the_gradient_asked_for():
    norm = _norm(16)
    norm.weight.requires_grad_(False)  # PEFT freezes norms
    x = torch.randn(4, 16, requires_grad=True)
    out = norm(x)
    assert _written(out)
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is None

    norm.weight.requires_grad_(True)
    out = norm(torch.randn(4, 16))
    assert _written(out)
    out.sum().backward()
    assert norm.weight.grad is not None


def test_torch_path_where_the_written_pass_does_not_apply():
    norm = _norm(16)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():
        assert not uses_written_pass(x, norm.weight)  # inference: torch's fused forward
        torch.testing.assert_close(norm(x), nn.functional.rms_norm(x, [16], norm.weight, 1e-6))
    assert not _written(norm.to(torch.bfloat16)(x.detach().bfloat16().requires_grad_()))
    assert not uses_written_pass(x, None)
    assert not uses_written_pass(torch.randn(0, 16, requires_grad=True), norm.weight)


def test_fp64_uses_the_written_pass():
    norm = _norm(8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = norm(x)
    assert _written(out)
    torch.testing.assert_close(out, naive_rms_norm(x, norm.weight, 1e-6))


def test_build_norm_gives_it_with_nn_rmsnorm_state():
    norm = build_norm("rmsnorm", 12, eps=1e-5)
    assert isinstance(norm, RMSNorm) and isinstance(norm, nn.RMSNorm)
    assert list(norm.state_dict()) == list(nn.RMSNorm(12).state_dict())


def test_double_backward_raises_instead_of_giving_wrong_numbers():
    norm = _norm(8)
    x = torch.randn(4, 8, requires_grad=True)
    (grad_x,) = torch.autograd.grad(norm(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_x.sum().backward()


def test_forward_ad_and_torch_func_take_torch_path():
    import torch.autograd.forward_ad as forward_ad
    from torch.func import functional_call, grad

    norm = _norm(8)
    x = torch.randn(3, 8)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn(3, 8))
        tangent = forward_ad.unpack_dual(norm(dual)).tangent
    assert tangent is not None
    params = {k: v.detach() for k, v in norm.named_parameters()}
    weight_grad = grad(lambda p: functional_call(norm, p, (x,)).sum())(params)["weight"]
    torch.testing.assert_close(weight_grad, (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0))


def test_bf16_autocast_takes_the_written_pass_on_the_fp32_residual_stream():
    """Autocast leaves an fp32 rms_norm in fp32: the written pass gives torch's values there,
    and a bf16 input (no fused kernel for mixed dtypes) keeps torch's path."""
    norm, reference = _norm(16), nn.RMSNorm(16, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = norm(x), reference(x)
        assert _written(out) and out.dtype == torch.float32
        assert torch.equal(out, expected)
        assert not _written(norm(x.detach().bfloat16().requires_grad_()))
    grad = torch.randn_like(out)
    want = torch.autograd.grad(expected, (x, reference.weight), grad, retain_graph=True)
    got = torch.autograd.grad(out, (x, norm.weight), grad, retain_graph=True)
    # A backward called inside autocast too: its row dot product (`linalg.vecdot`, on autocast's
    # bf16 list) must stay fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_inside = torch.autograd.grad(out, (x, norm.weight), grad)
    for a, a_inside, b in zip(got, got_inside, want):
        assert a.dtype == a_inside.dtype == torch.float32
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a_inside, b)
