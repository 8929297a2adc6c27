"""Compression after training: measure and evaluate, compress, evaluate again (and again after
fine-tuning), all in the run's own process, and say what changed.

The metric is the validation split's (every `val/*` the task logs), computed by a fresh
single-device Trainer with the run's `limit_val_batches` — the same for before and after.
Quantized models are evaluated on the CPU in fp32 (where their kernels run), and then so is
the model before quantization. Fine-tuning after pruning trains `finetune_steps` more steps on
the training data with a fresh optimizer and schedule of that length; masks (unstructured) stay
attached, so pruned weights stay zero. The run's own checkpoints are the model before
compression. Unstructured pruning keeps every shape, so its result is also written as
`checkpoints/pruned.ckpt` (an lmlab checkpoint: `init_from=` takes it); shrunk (structured) and
quantized models cannot be rebuilt from a `ModelConfig` and are not written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from lmlab.checkpoint import BACKBONE_PREFIX, METADATA_KEY, tokenizer_files
from lmlab.compress.base import Compression, NoCompression
from lmlab.compress.measure import latency_per_token_ms, parameter_count, size_in_bytes
from lmlab.errors import ConfigError

log = logging.getLogger("lmlab")


def _trainer(trainer_cfg: DictConfig, compression: Compression, **kwargs: Any) -> L.Trainer:
    cpu = compression.cpu_only
    return L.Trainer(
        accelerator="cpu" if cpu else trainer_cfg.get("accelerator", "auto"),
        devices=1,
        precision="32-true" if cpu else trainer_cfg.get("precision", "32-true"),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[],
        **kwargs,
    )


def evaluate(task: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg: DictConfig,
             compression: Compression) -> dict[str, float]:
    trainer = _trainer(trainer_cfg, compression, limit_val_batches=trainer_cfg.get("limit_val_batches", 1.0))
    trainer.validate(task, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def finetune(task: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg: DictConfig,
             compression: Compression, steps: int) -> None:
    trainer = _trainer(
        trainer_cfg, compression, max_steps=steps, limit_val_batches=0,
        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
        accumulate_grad_batches=trainer_cfg.get("accumulate_grad_batches", 1),
    )
    trainer.fit(task, datamodule=datamodule)


def _measure(compression: Compression, backbone: torch.nn.Module, vocab_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"params": parameter_count(backbone), "size_bytes": size_in_bytes(backbone)}
    if hasattr(compression, "sparsity_report"):
        out.update(compression.sparsity_report(backbone))
    if compression.measures_latency:
        out["latency_ms_per_token"] = latency_per_token_ms(
            backbone, vocab_size, n_tokens=compression.latency_tokens, repeats=compression.latency_repeats)
    return out


PRUNED_NAME = "pruned.ckpt"
# Methods whose trained backbone is plain layers (nothing injected that init_from could not load).
PLAIN_PEFT = ("none", "full", "bitfit", "frozen")


def write_backbone_checkpoint(task: L.LightningModule, path: Path) -> Path:
    """The backbone as an lmlab checkpoint (weights, model config, tokenizer), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"model": task.checkpoint_metadata["model"], "peft": {"method": "none"},
                "tokenizer_files": tokenizer_files(task.tokenizer)}
    state = {f"{BACKBONE_PREFIX}{k}": v.detach().cpu() for k, v in task.backbone.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state, METADATA_KEY: metadata}, tmp)
    os.replace(tmp, path)
    return path


def check_compression(compression: Compression, parts: Any, trainer_cfg: DictConfig) -> None:
    """Before compute: the method fits the backbone, the schedule fits the run, and fine-tuning
    has something to train."""
    compression.check(parts.task.backbone, trainer_cfg.get("max_steps"))
    if not isinstance(compression, NoCompression) and (trainer_cfg.get("strategy") is not None
                                                       or trainer_cfg.get("devices", 1) not in (1, "1", "auto")):
        raise ConfigError("compress", compression.method, ["none"],
                          "compression runs in one process on one device; train with the multi-device trainer, "
                          "then compress its checkpoint: init_from=<ckpt> trainer.max_steps=0 "
                          f"compress={compression.method}")
    strategy = parts.strategy
    quantized = [n for n, m in parts.task.backbone.named_modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]
    if quantized and not isinstance(compression, NoCompression):
        raise ConfigError("compress", compression.method, ["none"],
                          f"peft={strategy.method} already quantized the backbone ({quantized[0]} is "
                          f"{type(parts.task.backbone.get_submodule(quantized[0])).__name__}); compress a plain one")
    if compression.finetune_steps and strategy.can_merge:
        raise ConfigError("compress.finetune_steps", compression.finetune_steps, [0],
                          f"peft={strategy.method} adapters are merged into the backbone before compressing, "
                          "which leaves nothing trainable to fine-tune; use peft=none or peft=full")


def compress_after_training(compression: Compression, parts: Any,
                            trainer_cfg: DictConfig) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Compress the run's backbone in place; returns the record's `compress` section and
    metrics to add to the run's (`compressed/val/...`, `finetuned/val/...`). PEFT adapters that
    can merge are folded into the backbone first: compression works on plain layers."""
    if isinstance(compression, NoCompression):
        return None, {}
    task, datamodule = parts.task, parts.datamodule
    if parts.strategy.can_merge:
        task.backbone = parts.strategy.merge(task.backbone)
    vocab_size = task.tokenizer.vocab_size
    if compression.cpu_only:
        task.to("cpu")
    task.eval()
    before = _measure(compression, task.backbone, vocab_size)
    metrics_before = evaluate(task, datamodule, trainer_cfg, compression)

    backbone, details = compression.apply(task.backbone)
    task.backbone = backbone
    metrics_after = evaluate(task, datamodule, trainer_cfg, compression)
    section: dict[str, Any] = {**compression.to_dict(), **details, "metrics_before": metrics_before,
                               "metrics_after": metrics_after}
    metrics = {f"compressed/{k}": v for k, v in metrics_after.items()}
    if compression.finetune_steps:
        task.train()
        finetune(task, datamodule, trainer_cfg, compression, compression.finetune_steps)
        section["metrics_after_finetune"] = evaluate(task, datamodule, trainer_cfg, compression)
        metrics.update({f"finetuned/{k}": v for k, v in section["metrics_after_finetune"].items()})
    task.backbone = compression.finish(task.backbone)
    if getattr(compression, "kind", None) == "unstructured" and trainer_cfg.get("default_root_dir"):
        if parts.strategy.can_merge or parts.strategy.method in PLAIN_PEFT:
            section["checkpoint"] = str(write_backbone_checkpoint(
                task, Path(trainer_cfg.default_root_dir) / "checkpoints" / PRUNED_NAME))
    task.eval()
    after = _measure(compression, task.backbone, vocab_size)
    for key in sorted(set(before) | set(after)):
        section[f"{key}_before"], section[f"{key}_after"] = before.get(key), after.get(key)
    log.info("compress=%s: %s", compression.method,
             ", ".join(f"{k} {section[k]}" for k in ("params_after", "size_bytes_after", "sparsity_after")
                       if section.get(k) is not None))
    return section, metrics
