"""Synthetic sequence tasks with a hard prompt naming the task.

The tasks of the LoRA-on-sequence-tasks studies: sort ascending, sort descending, add 1, add 2
over short lists of integers, e.g. input ``add 2: 8 13 2 5`` → target ``10 15 4 7``. They are
small enough to learn on a CPU in minutes, and exact-match accuracy makes learning visible.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmlab.errors import ConfigError

TASKS: dict[str, tuple[str, Callable[[list[int]], list[int]]]] = {
    "sort_asc": ("sort ascending", lambda xs: sorted(xs)),
    "sort_desc": ("sort descending", lambda xs: sorted(xs, reverse=True)),
    "add_1": ("add 1", lambda xs: [x + 1 for x in xs]),
    "add_2": ("add 2", lambda xs: [x + 2 for x in xs]),
    "reverse": ("reverse", lambda xs: xs[::-1]),
}


@dataclass(frozen=True)
class Example:
    task: str
    source: str  # "add 2: 8 13 2 5"
    target: str  # "10 15 4 7"


def validate_task_names(tasks) -> list[str]:
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("data.tasks", tasks, list(TASKS), "at least one task is needed")
    for name in tasks:
        if name not in TASKS:
            raise ConfigError("data.tasks", name, list(TASKS), "unknown synthetic task")
    if len(set(tasks)) != len(tasks):
        raise ConfigError("data.tasks", tasks, reason="a task is listed twice")
    return tasks


def make_splits(
    tasks: list[str], n_numbers: int, low: int, high: int, sizes: dict[str, int], seed: int
) -> dict[str, list[Example]]:
    """Deterministic, disjoint splits per task.

    Each task draws from its own generator (seeded by the run seed and the task's name), so
    adding a task to the list leaves the other tasks' examples unchanged. Inputs seen in test or
    validation are never in training.
    """
    splits: dict[str, list[Example]] = {name: [] for name in sizes}
    order = ["test", "val", "train"]  # held-out splits claim inputs first
    for task in validate_task_names(tasks):
        words, fn = TASKS[task]
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        seen: set[tuple[int, ...]] = set()
        for split in order:
            need = sizes[split]
            got = 0
            while got < need:
                draw = rng.integers(low, high + 1, size=(max(need - got, 16) * 2, n_numbers))
                for row in map(tuple, draw.tolist()):
                    if row in seen:
                        continue
                    seen.add(row)
                    splits[split].append(
                        Example(task, f"{words}: {' '.join(map(str, row))}", " ".join(map(str, fn(list(row)))))
                    )
                    got += 1
                    if got == need:
                        break
    return splits
