"""`lmlab report`: a sweep directory (with failed and unfinished jobs) → table, CSV, plots."""

from __future__ import annotations

import csv
import json

import pytest

from lmlab import DataError
from lmlab.report import build_table, find_records, make_report, parse_overrides


def _job(root, num, overrides, status="completed", metrics=None, curve=None):
    job = root / str(num)
    job.mkdir(parents=True)
    record = {"status": status, "overrides": overrides, "metrics": metrics or {},
              "params": {"total": 1000, "trainable": 100}, "wall_time_s": 12.5}
    (job / "metrics.json").write_text(json.dumps(record))
    if curve:
        (job / "csv").mkdir()
        with open(job / "csv" / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train/loss", "val/loss"])
            for step, loss in curve:
                w.writerow([step, loss, ""])
    return job


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    _job(root, 0, ["peft=lora", "peft.r=4", "seed=0"], metrics={"val/loss": 1.5, "test/acc": 0.5},
         curve=[(1, 3.0), (2, 2.0)])
    _job(root, 1, ["peft=lora", "peft.r=8", "seed=0"], metrics={"val/loss": 1.2, "test/acc": 0.7},
         curve=[(1, 3.1), (2, 1.9)])
    _job(root, 10, ["peft=lora", "peft.r=16", "seed=0"], status="failed")
    _job(root, 2, ["peft=lora", "peft.r=32", "seed=0"], status="running")
    (root / "3").mkdir()  # a job that never wrote anything is simply not a row
    return root


def test_table_has_varying_overrides_status_and_metrics(sweep):
    records = find_records(sweep)
    assert [p.name for p, _ in records] == ["0", "1", "2", "10"]  # natural order
    columns, rows, varying, wanted = build_table(records, sweep)
    assert varying == ["peft.r"]  # peft=lora and seed=0 are shared context
    assert columns[:3] == ["run", "status", "peft.r"]
    assert [r["status"] for r in rows] == ["completed", "completed", "running", "failed"]
    assert rows[1]["val/loss"] == 1.2 and rows[3]["val/loss"] == ""
    assert "test/acc" in wanted


def test_make_report_writes_markdown_csv_and_plots(sweep):
    out = make_report(sweep)
    md = (out / "report.md").read_text()
    assert "4 runs: 2 completed, 1 failed, 1 running." in md
    assert "| 1 | completed | 8 | 1.2 |" in md
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["peft.r"] == "4"
    for png in ("val_loss_vs_peft.r.png", "train_loss.png"):
        assert (out / png).stat().st_size > 1000
        assert png in md


def test_errors_and_override_parsing(tmp_path):
    with pytest.raises(DataError, match="no such run"):
        find_records(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metrics.json"):
        find_records(tmp_path / "empty")
    assert parse_overrides(["+a.b=1", "c=x=y", "flag"]) == {"a.b": "1", "c": "x=y"}


def test_tokenizer_sweeps_show_tokenizer_measurements(tmp_path):
    for num, kind, fertility in ((0, "bpe", 1.4), (1, "char", 4.2)):
        job = _job(tmp_path, num, [f"tokenizer={kind}"], metrics={"val/loss": 2.0})
        record = json.loads((job / "metrics.json").read_text())
        record["tokenizer"] = {"kind": kind, "fertility": fertility, "bytes_per_token": 3.0}
        (job / "metrics.json").write_text(json.dumps(record))
    columns, rows, _, _ = build_table(find_records(tmp_path), tmp_path)
    assert "tokenizer/fertility" in columns and "tokenizer/bytes_per_token" in columns
    assert [r["tokenizer/fertility"] for r in rows] == [1.4, 4.2]


def test_compression_sweeps_show_metrics_after_compressing(tmp_path):
    root = tmp_path / "multirun"
    _job(root, 0, ["compress.sparsity=0.5"],
         metrics={"val/loss": 1.0, "compressed/val/loss": 1.4, "finetuned/val/loss": 1.1})
    _job(root, 1, ["compress.sparsity=0.8"],
         metrics={"val/loss": 1.0, "compressed/val/loss": 3.0, "finetuned/val/loss": 1.6})
    columns, rows, _, wanted = build_table(find_records(root), root)
    assert {"compressed/val/loss", "finetuned/val/loss"} <= set(wanted) <= set(columns)
    assert [r["compressed/val/loss"] for r in rows] == [1.4, 3.0]
