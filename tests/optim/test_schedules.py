"""Schedules against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab import ConfigError
from lmlab.optim import schedules


def _lrs(make, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_noam_matches_the_paper():
    lrs = _lrs(schedules.noam, 50, d_model=64, warmup_steps=10)
    for i, lr in enumerate(lrs):
        s = i + 1
        assert lr == pytest.approx(64**-0.5 * min(s**-0.5, s * 10**-1.5))
    assert max(range(50), key=lambda i: lrs[i]) == 9  # peak at the end of warmup


def test_cosine_warms_up_then_decays_to_the_floor():
    lrs = _lrs(schedules.cosine, 110, warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10 + 50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_linear_and_constant():
    lin = _lrs(schedules.linear, 20, warmup_steps=0, min_lr_ratio=0.0)
    assert lin[0] == 1.0 and lin[10] == pytest.approx(0.5)
    const = _lrs(schedules.constant, 10, warmup_steps=4)
    assert const[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and const[4:] == [1.0] * 6


def test_bad_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="scheduler.warmup_steps"):
        schedules.cosine(opt, 10, warmup_steps=-1)
    with pytest.raises(ConfigError, match="scheduler.min_lr_ratio"):
        schedules.cosine(opt, 10, min_lr_ratio=2.0)
    with pytest.raises(ConfigError, match="scheduler.warmup_steps"):
        schedules.noam(opt, 10, d_model=8, warmup_steps=0)
