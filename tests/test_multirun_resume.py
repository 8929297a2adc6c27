"""Re-running a sweep: the same `-m` command lands in the same directory, skips the jobs it
completed and resumes the one that was killed from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.record import write_record
from lmlab.sweep import previous_record, sweep_name
from tests.conftest import ROOT, TINY_MODEL, TINY_SYNTHETIC


def test_sweep_name_is_a_function_of_the_overrides_only():
    a = sweep_name(["model=gpt,gqa", "debug=fast", "paths.log_dir=/x"])
    assert a == sweep_name(["debug=fast", "paths.log_dir=/x", "model=gpt,gqa"])  # order does not matter
    assert a != sweep_name(["model=gpt,mqa", "debug=fast", "paths.log_dir=/x"])
    assert a != sweep_name(["model=gpt,gqa", "debug=fast", "paths.log_dir=/y"])  # hashed, though not shown
    assert a.startswith("model=gpt,gqa_debug=fast_")  # what varies reads first
    assert "/" not in a and "paths" not in a
    assert sweep_name([]).startswith("default_")


def test_a_directory_holding_another_jobs_record_is_refused(tmp_path):
    write_record(tmp_path, {"status": "completed", "overrides": ["model=gpt"]})
    assert previous_record(tmp_path, ["model=gpt"])["status"] == "completed"
    assert previous_record(tmp_path / "none", ["model=gpt"]) is None
    with pytest.raises(ConfigError, match="another job"):
        previous_record(tmp_path, ["model=gqa"])


def _command(tmp_path: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "-m", "model=gpt,gqa", *TINY_MODEL, *TINY_SYNTHETIC,
        "trainer.max_steps=200", "trainer.val_check_interval=100", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks.last_checkpoint.every_n_steps=10",
        f"paths.log_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "print_config=false", "trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_rerunning_a_killed_sweep_skips_finished_jobs_and_resumes_the_rest(tmp_path):
    proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    multirun = tmp_path / "outputs" / "multirun"
    deadline = time.monotonic() + 300
    while not list(multirun.glob("*/1/checkpoints/last.ckpt")):
        assert proc.poll() is None, f"the sweep ended before job 1 checkpointed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "job 1 never checkpointed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep dies mid-job, as on a crash or node loss
    proc.wait()
    (sweep,) = multirun.iterdir()
    first = json.loads((sweep / "0" / "metrics.json").read_text())
    assert first["status"] == "completed"
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "running"

    again = subprocess.run(_command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in multirun.iterdir()] == [sweep.name]  # the same sweep directory
    assert json.loads((sweep / "0" / "metrics.json").read_text()) == first  # skipped, not re-trained
    assert "completed by an earlier run" in again.stdout + again.stderr
    resumed = json.loads((sweep / "1" / "metrics.json").read_text())
    assert resumed["status"] == "completed"
    assert resumed["step"] == 200
    assert resumed["resumed_from"].endswith("last.ckpt")
