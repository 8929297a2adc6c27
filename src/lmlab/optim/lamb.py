"""LAMB (You et al. 2019) from `pytorch_optimizer`, with the paper's step size.

`pytorch_optimizer.Lamb` divides the step size by the first-moment bias correction 1 − β1^t
*after* the trust ratio has normalised the update, which makes the first step 1/(1 − β1) = 10×
the paper's. In the paper the trust ratio cancels both bias corrections, so each tensor moves by
lr · φ(‖w‖) with φ(x) = min(x, 10); `adam_debias=True` is the library's switch for that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pytorch_optimizer import Lamb


def lamb(
    params: Iterable[Any],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decouple: bool = True,
    foreach: bool | None = None,
) -> Lamb:
    """LAMB; weight decay comes per parameter group from the task (`task.weight_decay`)."""
    return Lamb(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                weight_decouple=weight_decouple, foreach=foreach, adam_debias=True)
