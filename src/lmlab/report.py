"""`lmlab report <dir>`: a run or a sweep as one table (markdown + CSV) and plots (PNG).

Rows are runs (every `metrics.json` below the directory); columns are the overrides that vary
across them, the run's status, its final metrics, parameter counts, memory (bytes of parameters,
gradients, optimizer state), throughput and wall time.
Failed and unfinished runs stay in the table, marked by their status, so a sweep's holes show.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmlab.errors import DataError
from lmlab.record import RECORD_FILE
from lmlab.report_plots import plot_loss_curves, plot_metric_vs_setting

TOKENIZER_COLUMNS = ("vocab_size", "fertility", "tokens_per_char", "bytes_per_token", "unk_rate", "roundtrip_rate")
MEMORY_COLUMNS = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "cuda_peak_allocated_bytes")
DEFAULT_METRICS = ("val/loss", "val/ppl", "val/acc", "test/loss", "test/ppl", "test/acc", "test/bleu", "test/f1")


def find_records(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    root = Path(root)
    if not root.exists():
        raise DataError(root, "no such run or sweep directory")
    out = []
    for path in sorted(root.rglob(RECORD_FILE), key=lambda p: _natural_key(p.parent.relative_to(root))):
        try:
            out.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            out.append((path.parent, {"status": f"unreadable record ({err})"}))
    if not out:
        raise DataError(root, f"no {RECORD_FILE} below this directory (is it a run or a multirun directory?)")
    return out


def _natural_key(rel: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in rel.parts]


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def build_table(records: list[tuple[Path, dict[str, Any]]], root: Path, metrics: Iterable[str] | None = None):
    overrides = [parse_overrides(r.get("overrides", [])) for _, r in records]
    keys = sorted({k for o in overrides for k in o})
    # Only what varies is worth a column; a setting shared by every job is the sweep's context.
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1] or keys
    present = {m for _, r in records for m in r.get("metrics", {})}
    wanted = [m for m in (metrics or DEFAULT_METRICS) if m in present]
    if metrics is None:
        # Compression sweeps compare the metric after compressing (and after fine-tuning).
        wanted += sorted(m for m in present if m.split("/")[0] in ("test", "compressed", "finetuned")
                         and m not in wanted)
    # Tokenizer measurements (fertility, bytes/token, ...) matter when the sweep varies the tokenizer.
    tok_cols = []
    if any(k.startswith("tokenizer") for k in varying):
        tok_cols = [f"tokenizer/{k}" for k in TOKENIZER_COLUMNS if any(k in r.get("tokenizer", {}) for _, r in records)]
    # What training state weighs (see lmlab.callbacks.memory), in runs that measured it.
    mem_cols = [c for c in MEMORY_COLUMNS if any(c in (r.get("memory") or {}) for _, r in records)]
    columns = ["run", "status", *varying, *wanted, *tok_cols, "params", "trainable", *mem_cols, "tokens_per_sec",
               "wall_time_s"]
    rows = []
    for (run_dir, rec), ovr in zip(records, overrides):
        m = rec.get("metrics", {})
        row = {"run": str(run_dir.relative_to(root)) or ".", "status": rec.get("status", "unknown")}
        row.update({k: ovr.get(k, "") for k in varying})
        row.update({k: m.get(k, "") for k in wanted})
        row["params"] = rec.get("params", {}).get("total", "")
        row["trainable"] = rec.get("params", {}).get("trainable", "")
        row.update({k: (rec.get("memory") or {}).get(k, "") for k in mem_cols})
        row["tokens_per_sec"] = m.get("throughput/tokens_per_sec", "")
        row.update({f"tokenizer/{k}": v for k, v in rec.get("tokenizer", {}).items() if f"tokenizer/{k}" in tok_cols})
        row["wall_time_s"] = rec.get("wall_time_s", "")
        rows.append(row)
    return columns, rows, varying, wanted


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, str) and len(value) > 8:  # an override sampled by a sweeper: 0.0022881136684755237
        try:
            return f"{float(value):.4g}"
        except ValueError:
            pass
    return str(value)


def optuna_summary(root: Path) -> list[str]:
    """The best trial of an `hparams_search=optuna` sweep (its optimization_results.yaml)."""
    path = root / "optimization_results.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        results = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return []
    params = ", ".join(f"{k}={_fmt(str(v))}" for k, v in (results.get("best_params") or {}).items())
    return [f"Optuna best trial: {_fmt(results.get('best_value'))} with {params}.", ""]


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def make_report(root: str | Path, out_dir: str | Path | None = None, metric: str | None = None) -> Path:
    """Write report.md, report.csv and PNG plots for a run or sweep directory; returns out_dir."""
    root = Path(root)
    records = find_records(root)
    columns, rows, varying, wanted = build_table(records, root)
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "report.csv", columns, rows)
    metric = metric or next((m for m in ("val/loss", *wanted) if m in wanted), None)
    plots = []
    if metric:
        for setting in varying:
            name = f"{metric.replace('/', '_')}_vs_{setting.replace('/', '_')}.png"
            if plot_metric_vs_setting(rows, setting, metric, out / name):
                plots.append(name)
    labels = [
        (", ".join(f"{k}={r[k]}" for k in varying if r[k] != "") or r["run"], run_dir)
        for (run_dir, _), r in zip(records, rows)
    ]
    if plot_loss_curves(labels, out / "train_loss.png"):
        plots.append("train_loss.png")
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    body = [f"# Report: {root}", "", f"{len(rows)} runs: {summary}.", "", *optuna_summary(root),
            to_markdown(columns, rows)]
    body += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(body) + "\n")
    return out
