"""The PNG plots of `lmlab report`: the swept metric against each swept setting, loss curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (or available) here
import matplotlib.pyplot as plt  # noqa: E402


def as_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_loss_curve(run_dir: Path, metric: str = "train/loss") -> tuple[list[float], list[float]]:
    """(steps, values) of a metric from the run's CSV log (`csv/metrics.csv`), if it has one."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return [], []
    steps, values = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step, value = as_number(row.get("step")), as_number(row.get(metric))
            if step is not None and value is not None:
                steps.append(step)
                values.append(value)
    return steps, values


def plot_metric_vs_setting(rows: list[dict[str, Any]], setting: str, metric: str, path: Path) -> bool:
    points = [(row[setting], as_number(row.get(metric))) for row in rows if row.get("status") == "completed"]
    points = [(s, v) for s, v in points if v is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    numeric = all(as_number(s) is not None for s, _ in points)
    if numeric:
        points.sort(key=lambda p: float(p[0]))
        ax.plot([float(s) for s, _ in points], [v for _, v in points], "o-")
    else:
        labels = [str(s) for s, _ in points]
        ax.bar(range(len(points)), [v for _, v in points])
        ax.set_xticks(range(len(points)), labels, rotation=30, ha="right")
    ax.set_xlabel(setting)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_loss_curves(run_dirs: list[tuple[str, Path]], path: Path, metric: str = "train/loss") -> bool:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for label, run_dir in run_dirs:
        steps, values = read_loss_curve(run_dir, metric)
        if steps:
            ax.plot(steps, values, label=label, linewidth=1)
            drawn += 1
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if drawn <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return bool(drawn)
