"""What lmlab's machinery costs around the model: the Lightning run vs a raw PyTorch loop, and
the real data pipeline vs batches already in memory.

One run is composed from `conf/` as `python train.py` would (model=gqa at the bench
dimensions, data=text on TinyStories, a BPE tokenizer of the bench vocabulary, the default
callbacks and CSV logger) and assembled with `lmlab.assemble.build_parts`; both sides then
train that same task's backbone:

- lightning_vs_raw: `Trainer.fit` with the run's callbacks and logger vs a plain loop over the
  same module and loss function (the clm task's `causal_lm_loss`, backward, gradient clipping
  at `trainer.gradient_clip_val`, the run's optimizer and schedule), both reading the run's
  DataLoader: the ratio is what the Lightning loop and lmlab's callbacks cost, nothing else
  (what the fused loss buys over a hand-written `F.cross_entropy` is the `train` bench's
  business). Each step is timed from the end of the one before (so fit start-up, the first
  step and the end-of-run checkpoint are not counted) and the ratio is of the medians of all
  timed steps of all repeats, lmlab time / raw time: a whole repeat's mean moved by up to 30 %
  between repeats of the same side on this shared machine (1.27-1.75 s/step) while Lightning's
  own cost measured at a tiny model is ~3 ms a step, so a step slowed by another job must not
  drag its repeat along.
- data_pipeline: the raw step fed by the run's DataLoader (memory-mapped token windows,
  step-seeded sampler, collation), the batch's fetch included, vs the same step on batches
  collected beforehand. The two alternate step by step in one loop (which goes first swaps
  each pair) and the ratio is of the medians of the single steps: the goal is about a 2 %
  difference, and whole loops timed apart moved by ±4 % against each other on a quiet machine
  while the loader itself takes ~0.3 ms of a ~1.5 s step.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import open_dict

from bench.common import Row, Size, interleaved, synchronize, time_row
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


class _Clock(L.Callback):
    """The end of every training step, (wall, CPU) seconds."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(pl_module.device)
        self.ends.append((time.perf_counter(), time.process_time()))


def step_times(ends: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each step after the first, from the ends of all steps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(ends)]


def rows(size: Size, device: torch.device | str = "cpu") -> list[Row]:
    # Twice the size's steps per call and two more repeats than the other benches: the two
    # rows compare 3 % and 2 % differences, and at 5 repeats of 2 steps the raw loop's own
    # median moved by 7 % between two quiet runs (1.51 vs 1.61 s/step).
    timed_steps, repeats = 2 * size.steps, size.repeats + 2
    steps = timed_steps + 1  # the first step (iterator start, warm-up) is not timed
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

        def raw_loop(batches) -> list[tuple[float, float]]:
            # Lightning's teardown moves the module back to the CPU after each fit; moving it
            # in place keeps the optimizer's parameters the same objects.
            backbone.to(device)
            ends = []
            for batch in itertools.islice(batches, steps):
                raw_step(batch)
                synchronize(device)
                ends.append((time.perf_counter(), time.process_time()))
            return step_times(ends)

        def lightning() -> list[tuple[float, float]]:
            clock = _Clock()
            # Everything of the default callbacks but the console progress bar.
            callbacks = [c for c in build_list(cfg.callbacks, "callbacks")
                         if not isinstance(c, ProgressBar)] + [clock]
            trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks,
                                          logger=build_list(cfg.logger, "logger") or False)
            trainer.fit(task, datamodule=dm)
            return step_times(clock.ends)

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

        measured: dict[str, list[tuple[float, float]]] = {}

        def timed(name, fn):
            return lambda: measured.setdefault(name, []).extend(fn())

        interleaved({"lightning": timed("lightning", lightning),
                     "raw": timed("raw", lambda: raw_loop(dm.train_dataloader()))},
                    repeats, device=device)
        pairs = paired_steps(repeats * timed_steps)
    # interleaved() times whole calls (with set-up); the medians of the in-loop step times are
    # what compares the loops. Its warm-up call's steps are left out.
    warm = {k: v[timed_steps:] for k, v in measured.items()}
    per_step = {k: statistics.median(w for w, _ in v) for k, v in warm.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in warm.items()}
    step = {k: statistics.median(w for w, _ in v) for k, v in pairs.items()}
    step_cpu = {k: statistics.median(c for _, c in v) for k, v in pairs.items()}
    on_cpu = device.type == "cpu"  # CPU time means nothing while the host waits for a GPU
    return [
        time_row("lightning_vs_raw: lmlab run vs raw PyTorch loop", "s/step, fp32, same module "
                 f"and batches, median of {len(warm['raw'])} steps each from {repeats} interleaved "
                 f"repeats of {timed_steps} (goal: ≥ 0.97x the raw loop's speed)",
                 per_step["lightning"], per_step["raw"], LIGHTNING_GOAL,
                 cpu_ratio=cpu["lightning"] / cpu["raw"] if on_cpu else None),
        time_row("data_pipeline: real loader vs resident tensors",
                 f"s/step, fp32 raw step, median of {len(pairs['loader'])} steps each, "
                 f"alternating; the fetch alone: {step['fetch'] * 1e3:.2f} ms/step",
                 step["loader"], step["resident"], DATA_GOAL,
                 cpu_ratio=step_cpu["loader"] / step_cpu["resident"] if on_cpu else None),
    ]
