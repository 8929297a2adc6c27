"""Seeded held-out splits, stratified by class so small classes keep their share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence[int], fractions: dict[str, float], seed: int, rest: str = "train"
) -> dict[str, list[int]]:
    """Item indices per split: every class is divided in the given fractions (rounded per
    class), whatever is left goes to `rest`. Pass one constant label for a plain random split.

    Each split's indices are sorted (file order); the training sampler shuffles anyway, and
    sorted evaluation sets read the same in every run.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {name: [] for name in (*fractions, rest)}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, fraction in fractions.items():
            take = int(round(len(members) * fraction))
            out[name].extend(members[start : start + take].tolist())
            start += take
        out[rest].extend(members[start:].tolist())
    return {name: sorted(idx) for name, idx in out.items()}
