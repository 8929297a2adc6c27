"""Real 2-process trainings (CPU, gloo) with every data/model-parallel strategy lmlab ships.

For each strategy one run trains 4 steps (checkpoints at steps 2 and 4); for the sharded ones
(folder checkpoints) a second run starts from the step-2 checkpoint and trains to step 4. Checked: one run directory and one record per
run (no duplicates from the child rank), every rank ends with the same gathered weights, the
resumed run ends with the same weights as the straight one, and the final checkpoint (a folder
for FSDP2 / DeepSpeed) consolidates into one file that `lmlab export` and `init_from` read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.checkpoint import load_init_source
from lmlab.export import export_checkpoint
from lmlab.record import read_record
from lmlab.strategies.consolidate import consolidate, sharded_kind
from tests.conftest import ROOT

TINY = [
    "debug=fast", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64",
    "model.dropout=0.0", "data.n_train=64", "data.n_val=8", "data.n_test=8", "data.batch_size=4",
    "data.eval_batch_size=16", "trainer.limit_val_batches=1", "trainer.val_check_interval=4",
    "callbacks.last_checkpoint.every_n_steps=2", "test=false", "validate_after_fit=false",
    "print_config=false", "trainer.enable_progress_bar=false", "logger=csv",
]
# (trainer option, what its last.ckpt is)
STRATEGIES = [("ddp", None), ("fsdp", "fsdp"), ("deepspeed_zero2", "deepspeed"), ("deepspeed_zero3", "deepspeed")]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


def train(args: list[str], timeout: int = 300) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidated_backbone(ckpt: Path) -> dict[str, torch.Tensor]:
    state = consolidate(ckpt)["state_dict"] if ckpt.is_dir() else weights(ckpt)["state_dict"]
    return {k: v.float() for k, v in state.items() if k.startswith("backbone.")}


@pytest.mark.slow
@pytest.mark.parametrize("option,kind", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_two_process_training_saves_resumes_and_consolidates(option, kind, tmp_path):
    cache = tmp_path / "cache"
    common = [f"trainer={option}", "trainer.devices=2", *TINY, f"paths.cache_dir={cache}"]
    # The straight run: launched the way a user does, in a Hydra multirun (the known DDP + Hydra
    # pain: child ranks re-running the sweep or writing their own directories).
    sweep = tmp_path / "sweep"
    dumps = tmp_path / "dumps"
    train(["-m", *common, f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'outputs'}",
           "+callbacks.rank_weights._target_=tests.strategies.rank_weights.DumpRankWeights",
           f"+callbacks.rank_weights.dirpath={dumps}"])
    run_dir = sweep / "0"
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    assert not (tmp_path / "outputs").exists(), "a child rank made a run directory of its own"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")) == [Path("sweep/0/metrics.json")]
    record = read_record(run_dir)
    assert record["status"] == "completed" and record["step"] == 4
    # Rank 1 was started with the job and imported while rank zero did (strategies/warm_ranks.py).
    assert "rank handed to a process started with the job" in (run_dir / "train.log").read_text()

    # Every rank holds the same model.
    rank0, rank1 = weights(dumps / "weights_rank0.pt"), weights(dumps / "weights_rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # Sharded strategies save folders; every checkpoint consolidates to the ranks' weights.
    last = run_dir / "checkpoints" / "last.ckpt"
    assert sharded_kind(last) == kind
    final = consolidated_backbone(last)
    trained = [name for name in rank0 if name.startswith("backbone.")]  # tied weights once
    assert trained and set(trained) <= set(final)
    for name in trained:
        torch.testing.assert_close(final[name], rank0[name], rtol=0, atol=0, msg=name)

    # Resume from the step-2 checkpoint (kept as last.prev.ckpt) in a new directory. (DDP's
    # single-file checkpoints resume as single-process ones do: tests/callbacks/, test_train.py.)
    if kind is not None:
        resumed = tmp_path / "resumed"
        train([*common, f"hydra.run.dir={resumed}",
               f"ckpt_path={run_dir / 'checkpoints' / 'last.prev.ckpt'}"])
        record = read_record(resumed)
        assert record["status"] == "completed" and record["step"] == 4 and record["resumed_from"]
        after_resume = consolidated_backbone(resumed / "checkpoints" / "last.ckpt")
        for name, value in final.items():
            torch.testing.assert_close(after_resume[name], value, rtol=0, atol=0, msg=name)

    # One file for export and init_from.
    exported = export_checkpoint(last, tmp_path / "export")
    assert exported.is_file()
    plain = weights(exported)["state_dict"]
    for name, value in final.items():
        torch.testing.assert_close(plain[name], value, msg=name)
    source = load_init_source(last)
    assert source.model_config["d_model"] == 32
    assert set(source.state_dict) == {k[len("backbone."):] for k in final}


@pytest.mark.slow
def test_nonfinite_gradient_in_one_ranks_shard_stops_every_rank(tmp_path):
    # FSDP2 reduce-scatters the gradients: a NaN lands in one rank's shard only. Ranks deciding
    # alone would leave the others waiting in the next collective; the guard's reduction over
    # the DTensor gradients is global, so every rank stops at the same step.
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=fsdp", "trainer.devices=2", *TINY,
         "trainer.max_steps=5", "+callbacks.poison._target_=tests.strategies.poison_grads.PoisonShardAt",
         "+callbacks.poison.step=2", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("non-finite loss or gradients at step 2") >= 2, proc.stderr[-4000:]
    assert "[rank1]" in proc.stderr and read_record(run_dir)["status"] == "failed"


@pytest.mark.slow
def test_tokens_and_throughput_are_the_whole_jobs_with_per_batch_padding(tmp_path):
    # Classification pads each batch to its longest text, so the two ranks' batches differ in
    # length: the record's tokens_seen and throughput must be the sum of both ranks' batches,
    # not rank zero's (× 2).
    import json

    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    tiny = [arg for arg in TINY if not arg.startswith("data.")]
    train(["trainer=ddp", "trainer.devices=2", *tiny, "task=classify", "data=classification",
           "data.batch_size=8", "data.eval_batch_size=16", "data.max_length=64",
           "trainer.max_steps=6", f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={tmp_path / 'cache'}",
           "+callbacks.rank_batches._target_=tests.strategies.rank_batches.DumpRankBatches",
           f"+callbacks.rank_batches.dirpath={dumps}"])
    ranks = [json.loads((dumps / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(batches) == 6 for batches in ranks)
    assert [b["T"] for b in ranks[0]] != [b["T"] for b in ranks[1]]  # the case at stake
    record = read_record(run_dir)
    assert record["tokens_seen"] == sum(b["real"] for batches in ranks for b in batches)
    throughput = record["throughput"]
    measured = sum(b["B"] * b["T"] for batches in ranks for b in batches[1:])  # warm-up: 1
    assert throughput["devices"] == 2 and throughput["batches_measured"] == 5
    assert throughput["tokens_per_sec"] * throughput["seconds_measured"] == pytest.approx(measured)
    samples = sum(b["B"] for batches in ranks for b in batches[1:])
    assert throughput["samples_per_sec"] * throughput["seconds_measured"] == pytest.approx(samples)
    assert "rank zero" not in (throughput["note"] or "")


@pytest.mark.slow
def test_time_based_checkpoints_agree_across_ranks(tmp_path):
    # every_n_seconds reads each rank's own clock, and rank 1 starts later than rank 0: the
    # ranks disagreed about when a save was due, and the save is collective, so the job hung
    # (rank zero in the save, rank one in the next step). Rank zero's clock decides now.
    run_dir = tmp_path / "run"
    train(["trainer=ddp", "trainer.devices=2", *TINY, "trainer.max_steps=40",
           "trainer.val_check_interval=1000", "callbacks.last_checkpoint.every_n_steps=null",
           "callbacks.last_checkpoint.every_n_seconds=0.3", f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={tmp_path / 'cache'}"], timeout=240)
    record = read_record(run_dir)
    assert record["status"] == "completed" and record["step"] == 40
    # saves by time did happen before the final one (whose predecessor is kept)
    previous = torch.load(run_dir / "checkpoints" / "last.prev.ckpt", map_location="cpu", weights_only=False)
    assert 0 < previous["global_step"] < 40


@pytest.mark.slow
def test_multirun_of_multiprocess_jobs_starts_each_jobs_ranks(tmp_path):
    # Hydra's default launcher runs a sweep's jobs one after another in this process. The first
    # job's launcher environment (LOCAL_RANK, MASTER_PORT, ...) and process group used to carry
    # over: the second job took its ranks for externally started ones, started none and failed
    # in its first collective against the first job's exited child.
    sweep = tmp_path / "sweep"
    train(["-m", "trainer=ddp", "trainer.devices=2", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={tmp_path / 'cache'}"], timeout=400)
    for job in ("0", "1"):
        record = read_record(sweep / job)
        assert record["status"] == "completed" and record["step"] == 4, (job, record.get("error"))


@pytest.mark.slow
def test_a_sweep_goes_on_after_a_job_whose_ranks_all_failed(tmp_path):
    # Lightning's process observer SIGKILLed rank zero (here: the sweep's process) within 5 s of
    # the other rank's failure, while rank zero was still failing on its own: its error was never
    # printed or recorded, and the sweep's later jobs never ran.
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "trainer=ddp", "trainer.devices=2", *TINY,
         "+callbacks.fail._target_=tests.strategies.failing_ranks.FailOnEveryRank", "+callbacks.fail.step=2",
         "+callbacks.fail.rank_zero_delay_s=8", "seed=0,1", f"hydra.sweep.dir={sweep}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in ("0", "1"):
        record = read_record(sweep / job)
        assert record["status"] == "failed", record
        assert record["error"] == "RuntimeError: planned failure on rank 0"


@pytest.mark.slow
@pytest.mark.parametrize("option", ["fsdp", "deepspeed_zero3"])
def test_a_non_finite_weight_in_one_ranks_shard_stops_every_ranks_save(option, tmp_path):
    # Each rank checked only its own shard before saving (ZeRO-3: its empty placeholders, i.e.
    # nothing): rank 1 refused to save while rank 0 went into the collective save and died on
    # the lost peer (gloo) or would wait there (NCCL). The verdict is every rank's now.
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"trainer={option}", "trainer.devices=2", *TINY,
         "trainer.max_steps=3", "callbacks.last_checkpoint.every_n_steps=null",
         "+callbacks.poison._target_=tests.strategies.poison_grads.PoisonWeightShardAtEnd",
         "+callbacks.poison.step=3", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("non-finite weights at step 3") >= 2, proc.stderr[-4000:]
    record = read_record(run_dir)
    assert record["status"] == "failed" and record["error"].startswith("NonFiniteError"), record["error"]


@pytest.mark.slow
def test_zero3_generation_in_validation_leaves_the_weights_trainable(tmp_path):
    # Validation's generation ran under inference_mode, which only FSDP2's DTensors turned off:
    # ZeRO-3's parameters became inference tensors (and the next save's weight check failed).
    run_dir = tmp_path / "run"
    train(["trainer=deepspeed_zero3", "trainer.devices=2", *TINY, "trainer.limit_val_batches=null",
           "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}",
           "+callbacks.inference_check._target_=tests.strategies.inference_check.NoInferenceParameters",
           f"paths.cache_dir={tmp_path / 'cache'}"])
    record = read_record(run_dir)
    assert record["status"] == "completed" and record["step"] == 4
