"""submitit launchers. `hydra/launcher=slurm` on a real single-node SLURM cluster
(scripts/slurm_cluster.sh): a sweep of SLURM jobs leaves one completed record per job, a DDP job
runs one rank per SLURM task in one run directory, and a job signalled for its time limit saves
last.ckpt, is requeued by submitit and finishes from that checkpoint. `hydra/launcher=local`: the
same jobs as local processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.report import make_report
from tests.conftest import ROOT, TINY_MODEL, TINY_SYNTHETIC

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Brings the cluster up (installing Debian's packages on first use) and, if it started it,
    down again at the end."""
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster needs root (apt-get, munged as user munge, slurmd)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no SLURM installed and no apt-get to install Debian's slurmctld/slurmd/munge")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"could not start a single-node SLURM cluster: {proc.stderr[-2000:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)


def _sweep_args(tmp_path: Path, *overrides: str, launcher: str = "slurm") -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "-m", f"hydra/launcher={launcher}", *TINY_MODEL, *TINY_SYNTHETIC,
        f"paths.log_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "print_config=false", "trainer.enable_progress_bar=false", "hydra.launcher.timeout_min=10",
        *overrides,
    ]


def _records(tmp_path: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "outputs" / "multirun").glob("*/*/metrics.json")}


def test_sweep_runs_every_job_on_slurm(slurm_cluster, tmp_path):
    proc = subprocess.run(_sweep_args(tmp_path, "debug=fast", "model=gpt,gqa"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert sorted(records) == ["0", "1"]
    assert all(r["status"] == "completed" for r in records.values())
    assert sorted(next(o for o in r["overrides"] if o.startswith("model=")) for r in records.values()) == [
        "model=gpt", "model=gqa"]
    # Each job ran as a SLURM job: submitit's folder holds one log directory per array task.
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    assert len(list((sweep / ".submitit").glob("*_[01]"))) == 2
    report = make_report(sweep)
    assert "2 completed" in (report / "report.md").read_text()


def _only_job_dirs(tmp_path: Path, expected: list[str]) -> Path:
    """The sweep left exactly these job directories and nothing else below outputs/ (no
    directory of its own for another rank, no single-run directory)."""
    (top,) = (tmp_path / "outputs").iterdir()
    assert top.name == "multirun"
    (sweep,) = top.iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == expected
    return sweep


def test_ddp_job_gets_one_rank_per_slurm_task_in_one_directory(slurm_cluster, tmp_path):
    proc = subprocess.run(_sweep_args(tmp_path, "debug=fast", "trainer=ddp", "trainer.devices=2", "seed=0"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _only_job_dirs(tmp_path, ["0"])
    assert _records(tmp_path)["0"]["status"] == "completed"
    (job,) = [p for p in (sweep / ".submitit").iterdir() if p.is_dir()]
    assert "#SBATCH --ntasks-per-node=2" in (job / f"{job.name}_submission.sh").read_text()
    # srun started both ranks; Lightning took them from SLURM (no processes of its own).
    logs = [(job / f"{job.name}_{task}_log.err").read_text() for task in (0, 1)]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    assert not (sweep / "0" / ".rank_config.yaml").exists()


def test_local_launcher_runs_jobs_as_processes(tmp_path):
    """Job 1 is a 2-process DDP run: Lightning starts its second rank, which shares the job's
    directory instead of making one of its own."""
    proc = subprocess.run(_sweep_args(tmp_path, "debug=fast", "trainer=default,ddp", launcher="local"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _only_job_dirs(tmp_path, ["0", "1"])
    records = _records(tmp_path)
    assert all(r["status"] == "completed" for r in records.values())
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran them
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_job_signalled_for_its_time_limit_is_requeued_and_resumes(slurm_cluster, tmp_path):
    name = f"lmlab_requeue_{os.getpid()}"
    steps = 600
    proc = subprocess.Popen(
        _sweep_args(tmp_path, "seed=3", f"trainer.max_steps={steps}", "trainer.val_check_interval=300",
                    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                    "callbacks.last_checkpoint.every_n_steps=20", f"hydra.launcher.name={name}"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        multirun = tmp_path / "outputs" / "multirun"
        _wait_for(lambda: list(multirun.glob("*/0/checkpoints/last.ckpt")), 300, "the first checkpoint", proc)
        job_id = _wait_for(
            lambda: subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"],
                                   capture_output=True, text=True).stdout.strip(),
            60, "the job in squeue", proc,
        )
        # What SLURM does signal_delay_s before the time limit (sbatch --signal=USR2@...).
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        _, err = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    record = _records(tmp_path)["0"]
    assert record["status"] == "completed"
    assert record["step"] == steps
    assert record["resumed_from"] and record["resumed_from"].endswith("last.ckpt")
    logs = "".join(p.read_text() for p in multirun.glob("*/.submitit/*/*_log.*"))
    assert "stopping at the end of this step to checkpoint and requeue" in logs
    assert "Requeued job" in logs
    # The requeued run started from the checkpoint the signal saved, not from step 0.
    assert "SIGTERM: saved" in logs
