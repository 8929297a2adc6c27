"""Checking an optimizer config before compute.

Optimizers validate their arguments only when constructed (or, for some libraries, at the first
step), which a Lightning run does after data is read and the model is built. `check_optimizer`
builds the configured optimizer on two throwaway parameters and takes one step, so a bad value
(`optimizer.lr=-1`, `optimizer.betas=[0.9]`, `optimizer.eps=[1e-3]` for Adafactor) is a
ConfigError naming the field before anything else happens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _build_and_step(factory: OptimizerFactory, weight_decay: float) -> None:
    # A matrix and a vector, in the two weight-decay groups the tasks build (`split_weight_decay`).
    matrix, vector = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(3))
    optimizer = factory([{"params": [matrix], "weight_decay": weight_decay},
                         {"params": [vector], "weight_decay": 0.0}])
    matrix.grad, vector.grad = torch.full_like(matrix, 0.1), torch.full_like(vector, 0.1)
    optimizer.step()


def _fails(factory: OptimizerFactory, weight_decay: float) -> Exception | None:
    try:
        _build_and_step(factory, weight_decay)
    except Exception as err:  # libraries raise their own types (e.g. pytorch_optimizer's NegativeLRError)
        return err
    return None


def check_optimizer(factory: OptimizerFactory, weight_decay: float = 0.1) -> None:
    """Raise ConfigError naming `optimizer.<field>` if the configured optimizer cannot be built
    or cannot step. The culprit is the field whose removal (the library's default) fixes it."""
    keywords: dict[str, Any] = dict(getattr(factory, "keywords", {}) or {})
    if "weight_decay" in keywords:
        raise ConfigError(
            "optimizer.weight_decay", keywords["weight_decay"],
            reason="weight decay is set per parameter group by task.weight_decay (matrices only); "
            "set task.weight_decay instead",
        )
    err = _fails(factory, weight_decay)
    if err is None:
        return
    target = getattr(getattr(factory, "func", None), "__name__", str(factory))
    reason = f"{target} refuses it ({type(err).__name__}: {err})"
    if isinstance(factory, functools.partial):
        for key in keywords:
            rest = {k: v for k, v in keywords.items() if k != key}
            if _fails(functools.partial(factory.func, *factory.args, **rest), weight_decay) is None:
                raise ConfigError(f"optimizer.{key}", keywords[key], reason=reason) from None
    raise ConfigError("optimizer", target, reason=reason) from None
