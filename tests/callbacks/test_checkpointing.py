"""Crash safety: atomic checkpoints, corrupt-checkpoint fallback, non-finite guard, kill/preempt resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lmlab.callbacks import NonFiniteError
from lmlab.record import read_record
from lmlab.train import resolve_ckpt_path, run
from tests.conftest import ROOT, TINY_MODEL, TINY_SYNTHETIC

pytestmark = pytest.mark.slow


def _inject(monkeypatch, extra):
    import lmlab.train as train_mod

    original = train_mod.build_list.__wrapped__ if hasattr(train_mod.build_list, "__wrapped__") else train_mod.build_list

    def build_list(node, group, **kw):
        items = original(node, group, **kw)
        return items + extra if group == "callbacks" else items

    monkeypatch.setattr(train_mod, "build_list", build_list)


class PoisonWeights(L.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).fill_(float("nan"))


class PoisonGradsOnce(L.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.at_step:
            next(p for p in pl_module.backbone.parameters() if p.grad is not None).grad.fill_(float("inf"))


STEPS = ["trainer.max_steps=6", "trainer.val_check_interval=3", "callbacks.last_checkpoint.every_n_steps=2"]


def test_nonfinite_stops_and_keeps_the_last_good_checkpoint(make_cfg, monkeypatch):
    cfg = make_cfg(STEPS)
    _inject(monkeypatch, [PoisonWeights(at_step=3)])
    with pytest.raises(NonFiniteError, match="step 3") as info:
        run(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert str(last) in str(info.value)
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert read_record(cfg.paths.output_dir)["status"] == "failed"


@pytest.mark.parametrize("check_every", ["null", "3"], ids=["host-decides", "fused-optimizer-skips"])
def test_nonfinite_skip_policy_drops_the_step_and_goes_on(make_cfg, monkeypatch, check_every):
    # null: read every step on a CPU, the gradients dropped; 3: the default fused AdamW skips the
    # step on the device and the count is read at step 2, the end of its window.
    cfg = make_cfg([*STEPS, "callbacks.nonfinite.policy=skip",
                    f"callbacks.nonfinite.check_every_n_steps={check_every}"])
    _inject(monkeypatch, [PoisonGradsOnce(at_step=2)])
    record = run(cfg)
    assert record["status"] == "completed" and record["step"] == 6
    assert record["metrics"]["train/skipped_steps"] == 1.0
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    # Five updates of six steps: only step 2 was skipped (a flag left set would skip more).
    assert {float(s["step"]) for s in state["optimizer_states"][0]["state"].values()} == {5.0}


class SigtermDuringValidation(L.Callback):
    """What a preemption signal looks like when it lands while the run is validating."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "fit" and trainer.global_step == 3:
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets


def test_sigterm_during_validation_saves_the_finished_steps(make_cfg, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    cfg = make_cfg([*STEPS, "trainer.limit_val_batches=2"])
    _inject(monkeypatch, [SigtermDuringValidation()])
    with pytest.raises(SIGTERMException):
        run(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3  # not the periodic save at step 2
    assert read_record(cfg.paths.output_dir)["status"] == "preempted"


def test_interrupted_write_leaves_the_previous_checkpoint(make_cfg, monkeypatch):
    cfg = make_cfg(STEPS)
    run(cfg)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    before = (ckpt_dir / "last.ckpt").read_bytes()
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if str(dst).endswith("last.ckpt") and ".last.ckpt.tmp" in str(src):
            raise OSError("killed mid-write")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_final_rename)
    with pytest.raises(OSError, match="killed mid-write"):
        run(make_cfg([*STEPS, "trainer.max_steps=8", "callbacks.last_checkpoint.every_n_steps=1"], name="run"))
    monkeypatch.setattr(os, "replace", real_replace)
    # Either last.ckpt is the old one or it was rotated to last.prev.ckpt: something loadable stays.
    resumable = resolve_ckpt_path(cfg, Path(cfg.paths.output_dir))
    assert resumable is not None
    torch.load(resumable, weights_only=True)
    assert (ckpt_dir / "last.ckpt").exists() or (ckpt_dir / "last.prev.ckpt").read_bytes() == before


def test_truncated_last_checkpoint_falls_back_to_the_previous(make_cfg, caplog):
    cfg = make_cfg(STEPS)
    run(cfg)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    assert (ckpt_dir / "last.prev.ckpt").is_file()
    data = (ckpt_dir / "last.ckpt").read_bytes()
    (ckpt_dir / "last.ckpt").write_bytes(data[: len(data) // 2])
    assert resolve_ckpt_path(cfg, Path(cfg.paths.output_dir)).endswith("last.prev.ckpt")
    assert "skipping unreadable checkpoint" in caplog.text
    (ckpt_dir / "last.prev.ckpt").write_bytes(b"garbage")
    assert resolve_ckpt_path(cfg, Path(cfg.paths.output_dir)) is None


# -- real processes, real signals ---------------------------------------------------------------
KILL_ARGS = ["debug=fast", *TINY_MODEL, *TINY_SYNTHETIC, "trainer.max_steps=40", "trainer.val_check_interval=20",
             "callbacks.last_checkpoint.every_n_steps=3", "trainer.enable_progress_bar=false", "print_config=false"]


def _cmd(run_dir: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *KILL_ARGS, f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache}"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _start_and_signal(cmd, run_dir: Path, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run both kinds of kill are compared with (and its data cache)."""
    root = tmp_path_factory.mktemp("straight")
    subprocess.run(_cmd(root / "run", root / "cache"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    return root / "run", root / "cache"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_identical_weights(tmp_path, sig, straight_run):
    straight, cache = straight_run
    interrupted = tmp_path / "interrupted"
    proc = _start_and_signal(_cmd(interrupted, cache), interrupted, sig)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, proc.stderr[-2000:]
        assert read_record(interrupted)["status"] == "preempted"
        step = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        assert 0 < step < 40
    else:
        assert proc.returncode == -signal.SIGKILL
    subprocess.run(_cmd(interrupted, cache), cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = read_record(interrupted)
    assert record["status"] == "completed" and record["step"] == 40
    assert record["resumed_from"]
    a, b = _final_weights(straight), _final_weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    def learned(metrics):  # wall-clock rates differ between runs; everything learned must not
        return {k: v for k, v in metrics.items() if not k.startswith("throughput/")}

    assert learned(record["metrics"]) == learned(read_record(straight)["metrics"])
    assert record["tokens_seen"] == read_record(straight)["tokens_seen"]


def test_resume_checkpoint_is_due_by_steps_and_by_wall_time(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import lmlab.callbacks.checkpointing as ckpt

    clock = [100.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: clock[0])
    by_time = ckpt.ResumeCheckpoint(str(tmp_path), every_n_steps=None, every_n_seconds=60)
    trainer = SimpleNamespace(global_step=7, received_sigterm=False, world_size=1)
    assert not by_time._due(trainer)
    clock[0] += 61
    assert by_time._due(trainer)
    by_steps = ckpt.ResumeCheckpoint(str(tmp_path), every_n_steps=5)
    assert [s for s in range(1, 16) if by_steps._due(SimpleNamespace(global_step=s, received_sigterm=False, world_size=1))] == [5, 10, 15]
    assert by_steps._due(SimpleNamespace(global_step=3, received_sigterm=True, world_size=1))  # preemption saves now


def test_several_ranks_save_by_rank_zeros_clock_through_the_consensus(monkeypatch, tmp_path):
    # With several processes the time-based decision rides on SigtermConsensus's CPU exchange
    # (no per-step broadcast, a device round trip on NCCL): the checkpoint lends its clock as
    # the vote, acts on the agreed vote, and ignores one made before its last save.
    from types import SimpleNamespace

    import lmlab.callbacks.checkpointing as ckpt
    from lmlab.strategies.preemption import SigtermConsensus

    clock = [100.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: clock[0])
    resume = ckpt.ResumeCheckpoint(str(tmp_path), every_n_steps=None, every_n_seconds=60)
    consensus = SigtermConsensus()
    consensus._group = object()  # as in a run of several processes
    broadcasts = []
    trainer = SimpleNamespace(global_step=7, received_sigterm=False, world_size=2, callbacks=[consensus],
                              strategy=SimpleNamespace(broadcast=lambda *a, **k: broadcasts.append(a)))
    assert not resume._due(trainer) and consensus.time_voter() is False
    clock[0] += 61
    assert consensus.time_voter() is True and not resume._due(trainer)  # not agreed yet
    consensus.time_due, consensus.time_vote_step = True, 6  # the vote cast at step 6 came back
    assert resume._due(trainer)
    resume._saved_step, resume._last_time = 7, clock[0]  # what save() records
    trainer.global_step, consensus.time_vote_step = 8, 7  # cast at step 7, before that save: stale
    assert not resume._due(trainer)
    trainer.global_step, consensus.time_vote_step = 9, 8
    assert resume._due(trainer) and broadcasts == []
