"""What lmlab's machinery costs around the model: the Lightning run vs a raw PyTorch loop, and
the real data pipeline vs batches already in memory.

One run is composed from `conf/` as `python train.py` would (model=gqa at the bench
dimensions, data=text on TinyStories, a BPE tokenizer of the bench vocabulary, the default
callbacks and CSV logger) and assembled with `lmlab.assemble.build_parts`; both sides then
train that same task's backbone:

- lightning_vs_raw: the steps of one `Trainer.fit` with the run's callbacks and logger vs
  raw steps over the same module and loss function (the clm task's `causal_lm_loss`, backward,
  gradient clipping at `trainer.gradient_clip_val`, an optimizer and schedule built as the
  run's), fed by their own iterator of the run's DataLoader: the ratio is what the Lightning
  loop and lmlab's callbacks cost, nothing else (what the fused loss buys over a hand-written
  `F.cross_entropy` is the `train` bench's business). The two alternate step by step: a
  callback runs one raw step at the end of every Lightning step, and a Lightning step is timed
  from the end of the raw step before it to its own end (the batch's fetch, the hooks, the
  logging and the optimizer step included). Whole fits and whole raw loops timed in turn
  (until 2026-11-23) moved by up to 30 % between repeats of the same side on this shared
  machine, so the row read 1.01-1.08x from run to run while the loop's own cost, timed by
  phase, is a few ms of a ~1.5 s step (`NonFiniteGuard`'s check 3-4 ms, Lightning's hooks and
  logging ~1.5 ms); side by side in one stream both see the same machine. Fit start-up, the first step of each side
  and the end-of-run checkpoint are not counted; ratio = the median over the pairs of (Lightning
  step / the raw step after it).
- data_pipeline: the raw step fed by the run's DataLoader (memory-mapped token windows,
  step-seeded sampler, collation), the batch's fetch included, vs the same step on batches
  collected beforehand. The two alternate step by step in one loop (which goes first swaps
  each pair) and the ratio is the median of the pairs' ratios: the goal is about a 2 %
  difference, whole loops timed apart moved by ±4 % against each other on a quiet machine, and
  the ratio of the two sides' medians still read 0.96-1.02x from run to run, while the loader
  itself takes ~0.6 ms of a ~1.2 s step (the row says the measured fetch).
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import open_dict

from bench.common import Row, Size, paired, synchronize, time_row
from lmlab.assemble import build_parts
from lmlab.instantiate import instantiate_checked
from lmlab.tasks.base import split_weight_decay
from lmlab.tasks.clm import causal_lm_loss
from lmlab.train import build_list

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (ROOT / ".." / "shared" / "data" / "tinystories" / "train_sample_2MiB.txt").resolve()
LIGHTNING_GOAL, DATA_GOAL = 1 / 0.97, 1.02


def compose_run(size: Size, out: Path, steps: int, device: torch.device | str = "cpu"):
    device = torch.device(device)
    on_device = ([] if device.type == "cpu" else
                 ["trainer.accelerator=gpu", f"trainer.devices=[{device.index or 0}]"])
    overrides = on_device + [
        "model=gqa", f"model.d_model={size.d_model}", f"model.n_layers={size.n_layers}",
        f"model.n_heads={size.n_heads}", f"model.n_kv_heads={size.n_kv_heads}",
        f"model.d_ff={size.d_ff}", f"model.max_seq_len={size.seq_len}",
        "data=text", f"data.path={CORPUS}", f"data.seq_len={size.seq_len}",
        f"data.batch_size={size.batch}", "data.tokenizer_train_chars=1000000",
        "tokenizer=bpe", f"tokenizer.vocab_size={size.vocab}",
        # fp32 on both sides (the raw loop has no autocast), whatever `auto` would pick.
        "trainer.precision=32-true",
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "validate_after_fit=false", "test=false", "print_config=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent)
        cfg.paths.cache_dir = str(ROOT / ".cache" / "lmlab")
    return cfg


class _Alternate(L.Callback):
    """After every Lightning step, one raw step (`raw_step()`, which fetches its own batch);
    (wall, CPU) seconds of each side's steps after the first."""

    def __init__(self, raw_step: Callable[[], None], device: torch.device):
        self.raw_step, self.device = raw_step, device
        self.times: dict[str, list[tuple[float, float]]] = {"lightning": [], "raw": []}
        self._raw_end = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lightning_end = self._now()
        with torch.enable_grad():
            self.raw_step()
        raw_end = self._now()
        if batch_idx > 0:
            for side, (a, b) in {"lightning": (self._raw_end, lightning_end),
                                 "raw": (lightning_end, raw_end)}.items():
                self.times[side].append((b[0] - a[0], b[1] - a[1]))
        self._raw_end = raw_end


def rows(size: Size, device: torch.device | str = "cpu") -> list[Row]:
    # 40 steps a side at the CPU size: single steps of the same work spread by ±15 % here, so
    # the medians of 28 moved by ~3 % between runs, the size of the goal.
    n_steps = (size.repeats + 5) * 2 * size.steps
    steps = n_steps + 1  # the first step (iterator start, warm-up) is not timed
    device = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(size, Path(tmp) / "run", steps, device)
        L.seed_everything(0, verbose=False)
        parts = build_parts(cfg)
        task, dm = parts.task, parts.datamodule
        backbone = task.backbone
        optimizer = task.optimizer_factory(split_weight_decay(task, task.weight_decay))
        scheduler = task.scheduler_factory(optimizer, total_steps=cfg.trainer.max_steps)
        clip = cfg.trainer.gradient_clip_val

        def raw_step(batch):
            ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            causal_lm_loss(backbone, ids, labels).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        def lightning_and_raw() -> dict[str, list[tuple[float, float]]]:
            raw_batches = iter(dm.train_dataloader())

            def interleaved_raw_step():
                # Lightning zeroes its gradients at the start of its next step: drop them so
                # the raw backward writes fresh ones, as it does in a loop of its own.
                optimizer.zero_grad(set_to_none=True)
                raw_step(next(raw_batches))

            alternate = _Alternate(interleaved_raw_step, device)
            # Everything of the default callbacks but the console progress bar.
            callbacks = [c for c in build_list(cfg.callbacks, "callbacks")
                         if not isinstance(c, ProgressBar)] + [alternate]
            trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks,
                                          logger=build_list(cfg.logger, "logger") or False)
            trainer.fit(task, datamodule=dm)
            return alternate.times

        def paired_steps(n_pairs: int) -> dict[str, list[tuple[float, float]]]:
            """(wall, CPU) seconds of each loader-fed step (its fetch included) and of each
            step on a resident batch, alternating."""
            backbone.to(device)
            resident = list(itertools.islice(dm.train_dataloader(), steps))
            loader = iter(dm.train_dataloader())
            raw_step(next(loader))
            raw_step(resident[0])
            times: dict[str, list[tuple[float, float]]] = {"loader": [], "resident": [],
                                                           "fetch": []}
            for i in range(n_pairs):
                for side in ("loader", "resident")[:: 1 if i % 2 == 0 else -1]:
                    synchronize(device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    if side == "loader":
                        batch = next(loader)
                        times["fetch"].append((time.perf_counter() - start, 0.0))
                    else:
                        batch = resident[1 + i % (len(resident) - 1)]
                    raw_step(batch)
                    synchronize(device)
                    times[side].append((time.perf_counter() - start,
                                        time.process_time() - start_cpu))
            return times

        loops = lightning_and_raw()
        pairs = paired_steps(n_steps)
    per_step = {k: statistics.median(w for w, _ in v) for k, v in loops.items()}
    step = {k: statistics.median(w for w, _ in v) for k, v in pairs.items()}
    on_cpu = device.type == "cpu"  # CPU time means nothing while the host waits for a GPU
    return [
        time_row("lightning_vs_raw: lmlab run vs raw PyTorch loop", "s/step, fp32, same module "
                 f"and batches, {len(loops['raw'])} steps each alternating in one fit, medians; "
                 "ratio = median of the pairs' ratios (goal: ≥ 0.97x the raw loop's speed)",
                 per_step["lightning"], per_step["raw"], LIGHTNING_GOAL,
                 cpu_ratio=paired(loops, "lightning", "raw", 1) if on_cpu else None,
                 paired_ratio=paired(loops, "lightning", "raw")),
        time_row("data_pipeline: real loader vs resident tensors",
                 f"s/step, fp32 raw step, {len(pairs['loader'])} steps each alternating, medians; "
                 "ratio = median of the pairs' ratios; the fetch alone: "
                 f"{step['fetch'] * 1e3:.2f} ms/step",
                 step["loader"], step["resident"], DATA_GOAL,
                 cpu_ratio=paired(pairs, "loader", "resident", 1) if on_cpu else None,
                 paired_ratio=paired(pairs, "loader", "resident")),
    ]
