"""`hparams_search=optuna`: a stored Optuna study over lr / weight decay / dropout that a second
run of the same command continues (crashed trials marked failed, n_trials counted over runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmlab.record import read_record
from lmlab.report import make_report
from lmlab.sweep import direction
from tests.conftest import ROOT, TINY_MODEL, TINY_SYNTHETIC


@pytest.mark.parametrize("metric,expected", [
    ("val/loss", "minimize"), ("val/ppl", "minimize"), ("val/loss@256", "minimize"),
    ("val/acc", "maximize"), ("test/bleu", "maximize"), ("val/f1", "maximize"),
])
def test_direction_follows_the_metric_name(metric, expected):
    assert direction(metric) == expected


def _optuna(tmp_path: Path, n_trials: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna", f"hydra.sweeper.n_trials={n_trials}",
         "debug=fast", *TINY_MODEL, *TINY_SYNTHETIC, f"paths.log_dir={tmp_path / 'outputs'}",
         f"paths.cache_dir={tmp_path / 'cache'}", "print_config=false", "trainer.enable_progress_bar=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_study_is_stored_and_a_rerun_continues_it(tmp_path):
    import optuna
    from optuna.trial import TrialState

    proc = _optuna(tmp_path, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="lmlab", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert study.direction == optuna.study.StudyDirection.MINIMIZE  # optimized_metric=val/loss
    assert set(study.trials[0].params) == {"optimizer.lr", "task.weight_decay", "model.dropout"}
    # A sweep killed mid-trial leaves that trial RUNNING in the storage.
    study.ask()

    proc = _optuna(tmp_path, 4)  # the same command, asking for 4 finished trials in all
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="lmlab", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 4
    assert states[2] == TrialState.FAIL  # the interrupted one
    # Directory N holds trial N: each record carries that trial's parameters and objective.
    for trial in study.trials:
        if trial.state != TrialState.COMPLETE:
            continue
        record = read_record(sweep / str(trial.number))
        assert record["status"] == "completed"
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in record["overrides"]
        assert record["metrics"]["val/loss"] == pytest.approx(trial.value)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(study.best_value)
    report = (make_report(sweep) / "report.md").read_text()
    assert "4 completed" in report and "optimizer.lr" in report
    assert f"Optuna best trial: {study.best_value:.4g}" in report


def test_a_misspelt_optimized_metric_is_named(caplog):
    import math

    from omegaconf import OmegaConf

    from lmlab.train import objective

    record = {"status": "completed", "metrics": {"val/acc": 0.5, "val/loss": 1.0}}
    assert objective(record, OmegaConf.create({"optimized_metric": "val/acc"})) == 0.5
    assert math.isnan(objective(record, OmegaConf.create({"optimized_metric": "val/accuracy"})))
    assert "optimized_metric=val/accuracy" in caplog.text and "val/acc, val/loss" in caplog.text
