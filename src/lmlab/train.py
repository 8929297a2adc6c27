"""`run(cfg)`: assemble the parts → fit → evaluate → write the run record.

Works with or without Hydra: tests call `run` with a composed config; `train.py` at the repo
root is the Hydra entry point and calls `main`, which adds what a sweep needs (a failed job is
recorded and the sweep goes on; the objective is returned to the sweeper).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lmlab.assemble import build_parts
from lmlab.callbacks.checkpointing import LAST_NAME, PREVIOUS_NAME
from lmlab.callbacks.memory import memory_of
from lmlab.callbacks.nonfinite import NonFiniteGuard
from lmlab.callbacks.throughput import run_throughput
from lmlab.checkpoint import load_resume_source
from lmlab.compress import build_compression, check_compression, compress_after_training
from lmlab.console import print_config_tree, print_results
from lmlab.describe import describe
from lmlab.errors import ConfigError, LmlabError
from lmlab.host_memory import set_host_memory
from lmlab.instantiate import instantiate_checked
from lmlab.loggers.wandb import finish_wandb_runs
from lmlab.optim.probe import check_optimizer
from lmlab.peft import parameter_counts
from lmlab.precision import resolve_auto_precision, use_fp32_matmuls_for_emulated_bf16
from lmlab.record import base_record, write_record
from lmlab.requeue import install_requeue_bridge
from lmlab.strategies import check_run
from lmlab.strategies.launch import (
    RunConfigLauncher,
    finish_launched_ranks,
    stop_observing_ranks,
    use_run_config_launcher,
)
from lmlab.strategies.preemption import use_sigterm_consensus
from lmlab.sweep import previous_record
from lmlab.tokenizers import tokenizer_metrics

log = logging.getLogger("lmlab")
LAST_CHECKPOINT = f"checkpoints/{LAST_NAME}"


def loadable(path: Path) -> bool:
    """A checkpoint file that torch can read (a kill mid-write or a full disk leaves one that isn't)."""
    if path.is_dir():  # FSDP2 / DeepSpeed folders
        from lmlab.strategies.consolidate import is_complete

        return is_complete(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception as err:
        log.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(err).__name__, err)
        return False


def latest_resumable(output_dir: Path) -> Path | None:
    for name in (LAST_NAME, PREVIOUS_NAME):
        path = output_dir / "checkpoints" / name
        if path.exists() and loadable(path):
            return path
    return None


def check_writable(output_dir: Path) -> None:
    """Fail now, not at the first checkpoint an hour in, if the run directory cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError("paths.output_dir", str(output_dir), reason=f"cannot write there ({err.strerror})") from None


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """`null` resumes the run directory's last good checkpoint when there is one; `last` insists
    on it; anything else is a checkpoint path."""
    value = cfg.get("ckpt_path")
    last = latest_resumable(output_dir)
    if value in (None, "", "auto"):
        return str(last) if last else None
    if value == "last":
        if last is None:
            raise ConfigError(
                "ckpt_path", value,
                reason=f"no readable {LAST_CHECKPOINT} in the run directory {output_dir}; to resume a "
                "run, point hydra.run.dir at its directory or give ckpt_path=<file>",
            )
        return str(last)
    if not Path(value).exists():
        raise ConfigError("ckpt_path", value, reason="no such checkpoint file")
    if not loadable(Path(value)):
        raise ConfigError("ckpt_path", value, reason="the file is not a readable checkpoint (truncated or corrupt)")
    return str(value)


def build_list(node: DictConfig | None, group: str, **kwargs: Any) -> list[Any]:
    """Callback/logger groups are dicts of named `_target_` nodes; `null` entries are skipped."""
    if not node:
        return []
    out = []
    for name, sub in node.items():
        if sub is not None and "_target_" in sub:
            out.append(instantiate_checked(sub, f"{group}.{name}", **kwargs))
    return out


def overrides_of(cfg: DictConfig) -> list[str]:
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return list(cfg.get("overrides", []) or [])


def measure_tokenizer(tokenizer, texts: list[str]) -> dict[str, float]:
    """Fertility, bytes/token, unk rate, ... of the run's tokenizer on held-out text, so a sweep
    over `tokenizer=` can be compared with `lmlab report`."""
    return tokenizer_metrics(tokenizer, texts) if texts else {"vocab_size": tokenizer.vocab_size}


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


record_writer = write_record


def _no_record(output_dir: Path, record: dict[str, Any]) -> None:
    """Ranks other than zero write no record."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and record one run (see `_run`); a multi-process job's other ranks, if
    this process started them, are ended with it, however it ends (a script or test calling
    `run` directly included)."""
    try:
        record = _run(cfg)
    except BaseException:
        finish_launched_ranks(grace_s=10)  # the other ranks have failed too, or will hang
        raise
    finish_launched_ranks()
    return record


def _run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the record written to metrics.json."""
    started = time.time()
    # Lightning has its own console handler; Hydra's root handler would print every line twice.
    logging.getLogger("lightning.pytorch").propagate = False
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config", True):
        print_config_tree(cfg)
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("seed", seed, reason="must be a non-negative integer")
    L.seed_everything(seed, workers=True, verbose=False)
    set_host_memory(cfg.get("host_memory"))

    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    check_writable(output_dir)
    # The Trainer (strategy, precision, devices) is cheap to build and refuses impossible
    # settings itself: build it before any data is read or tokenizer trained.
    loggers = build_list(cfg.get("logger"), "logger")
    compression = build_compression(OmegaConf.to_container(cfg.get("compress") or {"method": "none"}, resolve=True))
    callbacks = build_list(cfg.get("callbacks"), "callbacks") + compression.callbacks()
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    precision = resolve_auto_precision(cfg)
    if precision:
        log.info("trainer.precision=auto: %s on this hardware", precision)
    check_run(cfg)  # strategy, processes, precision, DeepSpeed config, PEFT: before any process starts
    trainer: L.Trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    guards = [c for c in callbacks if isinstance(c, NonFiniteGuard)]
    if any(g.policy == "skip" for g in guards):
        optimizer_factory = instantiate_checked(cfg.optimizer, "optimizer")
        check_optimizer(optimizer_factory)  # a bad field named first
        for guard in guards:
            guard.check_optimizer(optimizer_factory, trainer.strategy)
    use_run_config_launcher(trainer, cfg, overrides_of(cfg), ckpt_path)
    use_sigterm_consensus(trainer)  # multi-process runs: every rank stops at the same step
    if use_fp32_matmuls_for_emulated_bf16(trainer):
        log.info("trainer.precision=%s on a CPU without bf16 GEMM kernels: matrix products run on "
                 "the fp32 kernel with bf16-rounded operands and results (lmlab.precision)",
                 trainer.precision)
    # Rank zero alone writes the run's files; the other ranks of a multi-process run share its directory.
    write_record = record_writer if trainer.is_global_zero else _no_record
    parts = build_parts(cfg, load_resume_source(ckpt_path) if ckpt_path else None)
    params = parameter_counts(parts.task)  # backbone + task heads (e.g. the classifier)
    check_compression(compression, parts, cfg.trainer)

    # Everything validated: from here on the run leaves a record.
    output_dir.mkdir(parents=True, exist_ok=True)
    if trainer.is_global_zero:
        parts.datamodule.tokenizer.save(output_dir / "tokenizer")
    record = base_record(overrides_of(cfg))
    record.update(
        run_dir=str(output_dir),
        params=params,
        describe=describe(parts.model_config, backbone=parts.task.backbone,
                          seq_len=parts.datamodule.max_sequence_length),
        tokenizer={"kind": parts.datamodule.tokenizer.kind,
                   **measure_tokenizer(parts.datamodule.tokenizer, parts.datamodule.sample_texts())},
        model_config=parts.model_config.to_dict(),
        peft=parts.strategy.to_dict(),
        peft_report=parts.strategy.report(),  # what the method measured (e.g. bytes quantized)
        resumed_from=ckpt_path,
        init_from=str(parts.init_source.path) if parts.init_source else None,
        peft_from=cfg.get("peft_from"),
    )
    write_record(output_dir, record)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams({**resolved, "params/total": params["total"], "params/trainable": params["trainable"]})

    launcher = getattr(trainer.strategy, "_launcher", None)
    # A job killed for a lost rank while rank zero hangs in a collective: recorded first.
    if isinstance(launcher, RunConfigLauncher):
        launcher.on_abandon = lambda reason: write_record(output_dir, {
            **record, "status": "failed", "error": f"RankFailure: {reason}", "wall_time_s": time.time() - started})
    try:
        trainer.fit(parts.task, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics: dict[str, float] = _finite_metrics(trainer.callback_metrics)  # train/* as fit ended
        if cfg.get("validate_after_fit", True):
            trainer.validate(parts.task, datamodule=parts.datamodule, verbose=False)
        metrics.update(_finite_metrics(trainer.callback_metrics))
        if cfg.get("test", True):
            trainer.test(parts.task, datamodule=parts.datamodule, verbose=False)
            metrics.update(_finite_metrics(trainer.callback_metrics))
        compressed, compressed_metrics = compress_after_training(compression, parts, cfg.trainer)
        if compressed is not None:
            record["compress"] = compressed
            metrics.update(compressed_metrics)
    except BaseException as err:
        stop_observing_ranks()  # failing on its own: recording it must not be cut short
        record.update(
            status=_status_of(err),
            error=f"{type(err).__name__}: {err}",
            throughput=run_throughput(trainer),
            memory=memory_of(trainer),
            wall_time_s=time.time() - started,
            tokens_seen=int(parts.task.tokens_seen),
            step=trainer.global_step,
        )
        write_record(output_dir, record)
        finish_wandb_runs(loggers, exit_code=1)
        raise
    stop_observing_ranks()
    finish_wandb_runs(loggers)

    ckpt_cb = trainer.checkpoint_callback
    # Run means (tokens/s, TFLOP/s, MFU), also as metrics so `lmlab report` tables them.
    throughput = run_throughput(trainer)
    for key, value in (throughput or {}).items():
        if key in ("tokens_per_sec", "samples_per_sec", "tflops_per_sec", "mfu") and value is not None:
            metrics[f"throughput/{key}"] = value
    record.update(
        status="completed",
        throughput=throughput,
        memory=memory_of(trainer),  # parameter, gradient, optimizer-state bytes (MemoryMonitor)
        metrics=metrics,
        tokens_seen=int(parts.task.tokens_seen),
        step=trainer.global_step,
        wall_time_s=time.time() - started,
        best_checkpoint=getattr(ckpt_cb, "best_model_path", None) or None,
        last_checkpoint=str(output_dir / LAST_CHECKPOINT) if (output_dir / LAST_CHECKPOINT).exists() else None,
        optimized_metric=cfg.get("optimized_metric"),
    )
    write_record(output_dir, record)
    if trainer.is_global_zero:
        print_results(metrics, params, {"tokens_seen": record["tokens_seen"], "steps": record["step"],
                                        "wall_time_s": record["wall_time_s"]})
    log.info("run record: %s", output_dir / "metrics.json")
    return record


def _status_of(err: BaseException) -> str:
    if isinstance(err, SIGTERMException):
        return "preempted"
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    return "failed"


def objective(record: dict[str, Any], cfg: DictConfig) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    value = record.get("metrics", {}).get(name)
    if value is None and record.get("status") == "completed":
        # A misspelt metric would otherwise hand every trial's sweeper a silent NaN.
        log.error("optimized_metric=%s is not a metric of this run (valid: %s); the sweeper gets NaN",
                  name, ", ".join(sorted(record.get("metrics", {}))))
    return float(value) if value is not None else math.nan


def is_multirun() -> bool:
    if not HydraConfig.initialized():
        return False
    return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def record_failure(cfg: DictConfig, err: BaseException) -> None:
    """A job that failed before its run record existed still leaves one, so sweep reports
    show it as failed rather than missing."""
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / "metrics.json").exists():
        return
    record = base_record(overrides_of(cfg))
    record.update(status="failed", run_dir=str(output_dir), error=f"{type(err).__name__}: {err}")
    write_record(output_dir, record)


def completed_earlier(cfg: DictConfig) -> dict[str, Any] | None:
    """In a multirun, the record of this job if an earlier run of the sweep completed it."""
    if not is_multirun():
        return None
    record = previous_record(cfg.paths.output_dir, overrides_of(cfg))
    if record is not None and record.get("status") == "completed":
        log.info("skipping %s: completed by an earlier run of this sweep", cfg.paths.output_dir)
        return record
    return None


def main(cfg: DictConfig) -> float | None:
    """Hydra entry: user errors print one clear message; in a sweep a failed job is recorded
    (status "failed" in its metrics.json) and the sweep moves on, and a job an earlier run of
    the same sweep completed is skipped (its objective returned again)."""
    bridge = install_requeue_bridge()  # submitit jobs: checkpoint before requeueing
    try:
        done = completed_earlier(cfg)
        if done is not None:
            return objective(done, cfg)
        record = run(cfg)
    except LmlabError as err:
        log.error("%s: %s", type(err).__name__, err)
        if is_multirun():
            record_failure(cfg, err)
            return math.nan
        print(f"\n{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        log.warning("preempted (SIGTERM): last.ckpt saved; rerun the same command to resume")
        if bridge is not None and bridge.requested:
            bridge.requeue()  # SLURM: resubmitted, resumes from last.ckpt
        sys.exit(143)
    except Exception as err:
        if is_multirun():
            log.exception("job failed; the sweep goes on (see this job's metrics.json)")
            record_failure(cfg, err)
            return math.nan
        raise
    return objective(record, cfg)
