"""NonFiniteGuard's check itself (end-to-end stop/skip runs: test_checkpointing.py)."""

from __future__ import annotations

import pytest
import torch

from lmlab.callbacks import NonFiniteError, NonFiniteGuard
from lmlab.errors import ConfigError


class _Trainer:
    def __init__(self):
        self.global_step = 0


def _optimizer(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-dtype", "mixed-dtypes"])
def test_every_nonfinite_value_is_caught(bad, mixed):
    poisoned = torch.tensor([1.0, bad, 3.0], dtype=torch.bfloat16 if mixed else torch.float32)
    with pytest.raises(NonFiniteError, match="step 0"):
        NonFiniteGuard().on_before_optimizer_step(_Trainer(), None, _optimizer(torch.ones(4, 2), poisoned))
    NonFiniteGuard().on_before_optimizer_step(_Trainer(), None, _optimizer(torch.ones(4, 2),
                                                                          torch.full((3,), 1e30)))


@pytest.mark.parametrize("per_tensor", [True, False], ids=["aminmax", "foreach-inf-norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_both_checks_find_one_bad_element_anywhere(per_tensor, bad):
    # The CPU's per-tensor min/max and the accelerators' multi-tensor inf-norm, at positions in
    # the vectorised body and the scalar tail of each reduction, in every float dtype, against
    # the naive answer; huge finite values are not flagged.
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n, at in [(1, 0), (33, 0), (33, 32), (4097, 2050), (4097, 4096)]:
            grads = [torch.ones(3, 5, dtype=dtype), torch.full((n,), 6e4 if dtype == torch.float16
                                                                else 1e30, dtype=dtype)]
            assert not NonFiniteGuard._nonfinite(grads, per_tensor), (dtype, n)
            grads[1][at] = bad
            expected = not all(torch.isfinite(g).all() for g in grads)
            assert bool(NonFiniteGuard._nonfinite(grads, per_tensor)) is expected is True, (dtype, n, at)
    empty = [torch.zeros(0), torch.ones(2)]
    assert not NonFiniteGuard._nonfinite(empty, per_tensor)


def test_deferred_check_names_the_first_bad_step():
    guard, trainer = NonFiniteGuard(check_every_n_steps=3), _Trainer()
    good, bad = _optimizer(torch.ones(3)), _optimizer(torch.tensor([float("nan")]))
    for step, opt in [(0, good), (1, bad)]:
        trainer.global_step = step
        guard.on_before_optimizer_step(trainer, None, opt)  # no host read, no error yet
    trainer.global_step = 2
    with pytest.raises(NonFiniteError, match="step 1;"):
        guard.on_before_optimizer_step(trainer, None, good)


def test_deferred_check_runs_at_the_end_of_training():
    guard, trainer = NonFiniteGuard(check_every_n_steps=50), _Trainer()
    guard.on_before_optimizer_step(trainer, None, _optimizer(torch.tensor([float("inf")])))
    with pytest.raises(NonFiniteError, match="step 0;"):
        guard.on_train_end(trainer, None)


@pytest.mark.parametrize("kwargs", [{"check_every_n_steps": 0},
                                    {"policy": "skip", "check_every_n_steps": 5}])
def test_bad_check_interval_is_a_config_error(kwargs):
    with pytest.raises(ConfigError, match="check_every_n_steps"):
        NonFiniteGuard(**kwargs)


class _Module:
    def __init__(self, device: str):
        self.device = torch.device(device)


@pytest.mark.parametrize("device,policy,expected", [("cpu", "stop", 1), ("cuda", "stop", 25),
                                                    ("cuda", "skip", 1)])
def test_default_interval_reads_every_step_only_where_it_is_free(device, policy, expected):
    guard = NonFiniteGuard(policy=policy)
    guard.on_fit_start(_Trainer(), _Module(device))
    assert guard.check_every_n_steps == expected
    explicit = NonFiniteGuard(check_every_n_steps=7)
    explicit.on_fit_start(_Trainer(), _Module(device))
    assert explicit.check_every_n_steps == 7
