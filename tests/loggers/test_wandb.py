"""W&B without an account: logs offline into the run directory and never waits on the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.loggers.wandb import build_wandb_logger, wandb_logged_in
from lmlab.train import run


def test_no_login_is_detected(monkeypatch, tmp_path):
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in()


def test_auto_mode_goes_offline_and_says_how_to_sync(tmp_path, caplog):
    with caplog.at_level("INFO"):
        logger = build_wandb_logger(save_dir=str(tmp_path), mode="auto")
    assert logger._offline
    assert "wandb sync" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_run_with_wandb_logs_offline(make_cfg):
    cfg = make_cfg(["logger=wandb"])
    record = run(cfg)
    assert record["status"] == "completed"
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = list(runs[0].glob("*.wandb"))
    assert data and data[0].stat().st_size > 0
    # The resolved config, parameter counts and metrics are in the run's log (a protobuf stream).
    blob = data[0].read_bytes()
    for needle in (b"params/total", b"d_model", b"train/loss", b"val/loss", b"test/acc"):
        assert needle in blob, needle


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_multirun_jobs_share_a_wandb_group_and_carry_their_overrides(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY_MODEL, TINY_SYNTHETIC

    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "debug=fast", *TINY_MODEL, *TINY_SYNTHETIC,
         "logger=wandb", "seed=1,2", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}",
         "print_config=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    group = sweep.as_posix().replace("/", "_").strip("_")[-128:].encode()
    for job, seed in (("0", b"seed=1"), ("1", b"seed=2")):
        blob = next((sweep / job / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
        assert group in blob and seed in blob
