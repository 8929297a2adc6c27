"""concatenated_linear against the separate projections; when projections may be fused."""

import pytest
import torch
from torch import nn

from lmlab.models.layers.fused_projection import concatenated_linear, fusable, plain_linear


@pytest.mark.parametrize("bias", [False, True])
def test_one_matmul_equals_the_separate_projections_values_and_gradients(bias):
    torch.manual_seed(0)
    parts = (nn.Linear(16, 8, bias=bias), nn.Linear(16, 4, bias=bias), nn.Linear(16, 4, bias=bias))
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    parts = tuple(p.double() for p in parts)
    params = [x, *(t for p in parts for t in p.parameters())]
    fused = concatenated_linear(parts, x)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    grad = torch.randn_like(separate)
    torch.testing.assert_close(fused, separate)
    for a, b in zip(torch.autograd.grad(fused, params, grad),
                    torch.autograd.grad(separate, params, grad)):
        torch.testing.assert_close(a, b)


def test_only_plain_linears_with_the_same_bias_kind_are_fusable():
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    assert fusable((a, b))
    assert not fusable((a, nn.Linear(8, 8, bias=True)))  # one bias vector would be missing
    assert not fusable((a, b.double()))
    hooked = nn.Linear(8, 8, bias=False)
    hooked.register_forward_hook(lambda *args: None)
    assert not plain_linear(hooked) and not fusable((a, hooked))

    class Adapted(nn.Linear):  # what LoRA and quantised layers are: another forward
        pass

    assert not plain_linear(Adapted(8, 8)) and not plain_linear(nn.Identity())


class _Shard(torch.Tensor):
    """Stands for FSDP2's DTensor: a sharded parameter cannot be concatenated into a plain one."""


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_tensor_subclass_parameters_are_not_plain(name):
    layer = nn.Linear(4, 4)
    setattr(layer, name, nn.Parameter(torch.Tensor._make_subclass(_Shard,
                                                                  getattr(layer, name).detach())))
    assert not plain_linear(layer) and plain_linear(nn.Linear(4, 4))
