"""Bad optimizer values are ConfigErrors naming the field, found by building and stepping the
optimizer on throwaway parameters before any data or model exists."""

from __future__ import annotations

import functools

import bitsandbytes as bnb
import pytest
import torch

from lmlab import ConfigError
from lmlab.optim.lamb import lamb
from lmlab.optim.probe import check_optimizer

GOOD = [
    functools.partial(torch.optim.AdamW, lr=1e-3, betas=[0.9, 0.95]),
    functools.partial(bnb.optim.AdamW8bit, lr=1e-3, betas=[0.9, 0.95]),
    functools.partial(lamb, lr=1e-3, betas=[0.9, 0.999]),
    functools.partial(torch.optim.Adafactor, lr=1e-2, eps=[None, 1e-3]),
]


@pytest.mark.parametrize("factory", GOOD, ids=lambda f: f.func.__name__)
def test_good_optimizers_pass(factory):
    check_optimizer(factory)


BAD = [
    (functools.partial(lamb, lr=-1.0, betas=[0.9, 0.999]), "optimizer.lr"),
    (functools.partial(lamb, lr=1e-3, betas=[0.9, 1.5]), "optimizer.betas"),
    (functools.partial(torch.optim.Adafactor, lr=1e-2, eps=[1e-3]), "optimizer.eps"),
    (functools.partial(torch.optim.Adafactor, lr=1e-2, beta2_decay=0.5), "optimizer.beta2_decay"),
    (functools.partial(bnb.optim.AdamW8bit, lr=1e-3, betas=[0.9]), "optimizer.betas"),
    (functools.partial(torch.optim.AdamW, lr=1e-3, eps=-1.0), "optimizer.eps"),
    (functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), "optimizer.weight_decay"),
]


@pytest.mark.parametrize("factory,field", BAD, ids=[f for _, f in BAD])
def test_bad_value_names_the_field(factory, field):
    with pytest.raises(ConfigError) as info:
        check_optimizer(factory)
    assert info.value.field == field, str(info.value)
