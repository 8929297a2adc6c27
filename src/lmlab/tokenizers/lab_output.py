"""The tokenizer lab's rows as markdown tables, a CSV file and a PNG plot."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from lmlab.tokenizers.lab import ALL_TEXTS
from lmlab.tokenizers.metrics import METRIC_NAMES

# Column headers of the summary table, in order, with how each value is printed.
_SUMMARY = {
    "vocab_size": ("vocab", "{:.0f}"),
    "fertility": ("tokens/word", "{:.2f}"),
    "tokens_per_char": ("tokens/char", "{:.3f}"),
    "bytes_per_token": ("bytes/token", "{:.2f}"),
    "split_word_rate": ("split words", "{:.1%}"),
    "unk_rate": ("unk", "{:.2%}"),
    "vocab_utilisation": ("vocab used", "{:.1%}"),
    "encode_mb_per_s": ("MB/s", "{:.1f}"),
    "roundtrip_rate": ("exact round-trip", "{:.1%}"),
}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per tokenizer, over all text sets pooled."""
    pooled = [r for r in rows if r["text"] == ALL_TEXTS]
    header = ["tokenizer", *(title for title, _ in _SUMMARY.values())]
    body = [
        [r["tokenizer"], *(_fmt(fmt, r[key]) for key, (_, fmt) in _SUMMARY.items())] for r in pooled
    ]
    return markdown_table(header, body)


def pivot_table(rows: list[dict[str, Any]], metric: str, fmt: str = "{:.2f}") -> str:
    """Text sets down, tokenizers across: one metric per cell."""
    labels = list(dict.fromkeys(r["tokenizer"] for r in rows))
    texts = list(dict.fromkeys(r["text"] for r in rows if r["text"] != ALL_TEXTS))
    cell = {(r["text"], r["tokenizer"]): r.get(metric, math.nan) for r in rows}
    body = [[t, *(_fmt(fmt, cell.get((t, label), math.nan)) for label in labels)] for t in texts]
    return markdown_table(["text", *labels], body)


def report_markdown(rows: list[dict[str, Any]], reference: str | None) -> str:
    """The summary, then per-text-set fertility (and premium when there is a reference)."""
    parts = ["## Tokenizers over all texts", "", summary_table(rows)]
    if len({r["text"] for r in rows}) > 2:  # more than one set besides "all"
        if reference is not None:
            parts += ["", f"## Token premium relative to {reference} (tokens / its tokens)", ""]
            parts.append(pivot_table(rows, "premium"))
        parts += [
            "",
            "## Fertility (tokens per whitespace word)",
            "",
            pivot_table(rows, "fertility"),
        ]
        parts += ["", "## Tokens per character", "", pivot_table(rows, "tokens_per_char", "{:.3f}")]
    return "\n".join(parts) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    columns = ["tokenizer", "kind", "text", *METRIC_NAMES]
    if any("premium" in r for r in rows):
        columns.append("premium")
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, reference: str | None) -> Path:
    """Grouped bars per text set, one colour per tokenizer: premium (with a reference) or tokens
    per character, and fertility."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(r["tokenizer"] for r in rows))
    texts = list(dict.fromkeys(r["text"] for r in rows if r["text"] != ALL_TEXTS))
    cell = {(r["text"], r["tokenizer"]): r for r in rows}
    panels = [("premium", f"token premium vs {reference}")] if reference else []
    panels += [("tokens_per_char", "tokens per character"), ("fertility", "tokens per word")]
    size = (min(18, 4 + 0.12 * len(texts) * len(labels)), 3.2 * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False)
    x = np.arange(len(texts))
    width = 0.8 / max(1, len(labels))
    for ax, (metric, title) in zip(axes[:, 0], panels):
        for k, label in enumerate(labels):
            values = [cell.get((t, label), {}).get(metric, math.nan) for t in texts]
            ax.bar(x + (k - (len(labels) - 1) / 2) * width, values, width, label=label)
        ax.set_title(title)
        if metric == "fertility":  # unspaced scripts count whole sentences as one "word"
            ax.set_yscale("log")
        ax.set_xticks(x, texts, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(4, len(labels)))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)
