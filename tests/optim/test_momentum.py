"""Zero momentum buffers up front for torch's fused SGD: the same updates as torch's own first
step, and a first step skipped on the device leaves zeros, not uninitialised memory."""

from __future__ import annotations

import pytest
import torch

from lmlab.optim.momentum import zero_fused_momentum_buffers


def _run(grads, prepare: bool, skip_first: bool = False, **sgd):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD([param], lr=0.1, fused=True, **sgd)
    if prepare:
        zero_fused_momentum_buffers(optimizer)
    for i, grad in enumerate(grads):
        param.grad = grad.clone()
        if skip_first:
            # What a GradScaler overflow or NonFiniteGuard's skip flag does to the first step.
            optimizer.found_inf = torch.tensor(1.0 if i == 0 else 0.0)
        optimizer.step()
    return param.detach(), optimizer.state[param]["momentum_buffer"]


GRADS = [torch.linspace(-1, 1, 5), torch.linspace(0.5, -0.3, 5), torch.full((5,), 0.2)]


@pytest.mark.parametrize("sgd", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}],
                         ids=["momentum", "nesterov"])
def test_zero_buffers_give_torchs_updates(sgd):
    ours, theirs = _run(GRADS, prepare=True, **sgd), _run(GRADS, prepare=False, **sgd)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_a_skipped_first_step_leaves_zero_momentum():
    param, buffer = _run(GRADS[:1], prepare=True, skip_first=True, momentum=0.9)
    assert torch.equal(buffer, torch.zeros(5))
    # ... and the steps after it are those of a run that never saw it.
    skipped = _run([torch.full((5,), float("nan")), *GRADS], prepare=True, skip_first=True, momentum=0.9)
    clean = _run(GRADS, prepare=False, momentum=0.9)
    assert torch.equal(skipped[0], clean[0]) and torch.equal(skipped[1], clean[1])


def test_other_optimizers_and_settings_are_left_alone():
    param = torch.nn.Parameter(torch.ones(2))
    for optimizer in (torch.optim.SGD([param], lr=0.1, momentum=0.9),  # not fused
                      torch.optim.SGD([param], lr=0.1, momentum=0.9, dampening=0.1, fused=True),
                      torch.optim.SGD([param], lr=0.1, fused=True),  # no momentum
                      torch.optim.AdamW([param], fused=True)):
        zero_fused_momentum_buffers(optimizer)
        assert not optimizer.state
