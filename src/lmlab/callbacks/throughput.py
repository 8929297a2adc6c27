"""Training throughput of every run: tokens/s, samples/s, achieved TFLOP/s and MFU.

Logged to every logger as `throughput/tokens_per_sec`, `throughput/samples_per_sec`,
`throughput/tflops_per_sec` and `throughput/mfu` every `log_every_n_steps` optimizer steps,
and summarised over the whole run (`summary()`, written to `metrics.json` under
`throughput`), so even a four-step `debug=fast` run has its numbers.

- Tokens are input positions counted from tensor shapes (padding included: the hardware
  computes them), both sides for seq2seq; no tensor value is read, so there is no
  host-device sync per step. Each rank counts its own batches (with per-batch padding their
  lengths differ); the counts are summed over ranks in one all-reduce at each logging step and
  at the end of training (a run stopped before that reports rank zero's × ranks, with a note).
  On CUDA the clock is synchronised once per logging window, at validation and at the end, so
  the asynchronous queue does not blur the windows.
- FLOPs are `describe`'s analytic forward+backward count for each batch's shape
  (`TrainingFlops`: attention included, MoE at its active experts, encoder and decoder
  tokens for seq2seq, frozen weights without weight gradients under PEFT, prompt and prefix
  tuning's virtual tokens; the task's `flops_head_fraction` scales the output layer, e.g.
  mlm runs it on masked positions only, and the modules its `flops_row_modules` names, the
  last encoder layer after attention under mlm (at the head's share) and classify (at
  `flops_rows_per_sequence`, the pooled position); a distillation teacher's forward is added).
  Activation recomputation is not counted (MFU, not hardware FLOPs utilisation).
- MFU = achieved / (peak × devices), the peak from `peak_flops.PEAK_TFLOPS` for the GPU and
  the trainer's precision, or `peak_tflops` (per device) for anything else; null with a note
  when neither is known (e.g. a CPU without `peak_tflops`).
- The batches of the first `warmup_steps` optimizer steps (compilation, allocator and cache
  warm-up; with gradient accumulation a step is several batches), the time spent in validation
  and the time spent saving checkpoints are left out; batch-to-batch intervals include data
  loading. (Counting a 1.5 GB checkpoint save once halved the tokens/s of a 250-step 124M run
  on an H100.) `batches_measured` in the summary counts the (micro-)batches in the means.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from lmlab.callbacks.peak_flops import compute_kind, device_name, device_peak
from lmlab.errors import ConfigError
from lmlab.flops import TrainingFlops

METRICS = ("tokens_per_sec", "samples_per_sec", "tflops_per_sec", "mfu")


class _Window:
    """Sums over an interval of training batches."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0
        self.batches = 0

    def add(self, seconds: float, tokens: int = 0, samples: int = 0, flops: float = 0.0,
            batches: int = 0) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.samples += samples
        self.flops += flops
        self.batches += batches

    def counted(self, tokens: float, samples: float, flops: float) -> _Window:
        """This window's time and batches with other counts (the job's, summed over ranks)."""
        out = _Window()
        out.add(self.seconds, tokens, samples, flops, self.batches)
        return out

    def scaled(self, factor: int) -> _Window:
        return self.counted(self.tokens * factor, self.samples * factor, self.flops * factor)


def batch_shapes(batch: Any) -> tuple[int, int, int | None] | None:
    """(batch size, target/input length, source length or None) from a batch's id tensors."""
    if not isinstance(batch, dict):
        return None
    if "src_ids" in batch:
        target = batch.get("tgt_in", batch.get("tgt_ids"))
        if target is None:
            return None
        return target.shape[0], target.shape[1], batch["src_ids"].shape[1]
    if "input_ids" in batch:
        ids = batch["input_ids"]
        return ids.shape[0], ids.shape[1], None
    return None


class ThroughputMonitor(L.Callback):
    """See the module docstring. `peak_tflops`: per-device peak for MFU where the table has
    none (CPUs, other accelerators), or to override it."""

    def __init__(self, log_every_n_steps: int = 25, peak_tflops: float | None = None,
                 warmup_steps: int = 1):
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ConfigError("callbacks.throughput.log_every_n_steps", log_every_n_steps,
                              "an integer >= 1")
        if peak_tflops is not None and (isinstance(peak_tflops, bool)
                                        or not isinstance(peak_tflops, (int, float))
                                        or peak_tflops <= 0):
            raise ConfigError("callbacks.throughput.peak_tflops", peak_tflops,
                              "null (use the GPU table) or a number > 0 (TFLOP/s per device)")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError("callbacks.throughput.warmup_steps", warmup_steps, "an integer >= 0")
        self.log_every_n_steps = log_every_n_steps
        self.peak_tflops = peak_tflops
        self.warmup_steps = warmup_steps
        self._reset()

    def _reset(self) -> None:
        self._flops: TrainingFlops | None = None
        self._teacher_flops: TrainingFlops | None = None
        self._unknown_batch = False  # a batch whose shapes batch_shapes cannot read
        self._cuda: torch.device | None = None
        self._world = 1
        self._peak: float | None = None
        self._info: dict[str, Any] = {}
        self._total = _Window()
        self._window = _Window()
        self._warmup = _Window()
        self._seen = 0
        self._start_step = 0  # the optimizer step training (re)started at
        self._batch_step = 0  # optimizer steps done when the current batch started
        self._in_warmup = self.warmup_steps > 0  # the last accounted batch was a warm-up one
        self._first_start: float | None = None
        self._last: float | None = None
        self._logged_step = -1
        self._pending: Any = None  # the batch between its start and its end
        self._accounted_by_save = False
        # (total, warm-up) over all ranks, summed at the end of training.
        self._job: tuple[_Window, _Window] | None = None

    # ---- setup --------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        backbone = getattr(pl_module, "backbone", None)
        config = getattr(backbone, "config", None)
        if config is not None:
            head = float(getattr(pl_module, "flops_head_fraction", 1.0))
            self._flops = TrainingFlops(
                config, backbone, head_fraction=head,
                row_modules=getattr(pl_module, "flops_row_modules", ()),
                rows_per_sequence=getattr(pl_module, "flops_rows_per_sequence", None))
        # task=distill: the frozen teacher's forward on every batch is computed too.
        teacher = getattr(pl_module, "teacher", None)
        teacher_config = getattr(teacher, "config", None)
        if teacher_config is not None:
            self._teacher_flops = TrainingFlops(teacher_config, teacher, forward_only=True)
        device = pl_module.device
        self._cuda = device if device.type == "cuda" else None
        self._world = max(1, trainer.world_size)
        name, kind = device_name(device), compute_kind(trainer)
        note = None
        if self.peak_tflops is not None:
            self._peak, source = float(self.peak_tflops), "callbacks.throughput.peak_tflops"
        else:
            table_name, self._peak = device_peak(name, kind)
            source = f"table: {table_name} {kind}" if self._peak else None
            if self._peak is None:
                note = (f"no peak known for {name!r} at {kind}: set callbacks.throughput.peak_tflops "
                        "(TFLOP/s per device) to get an MFU")
        if self._flops is None:
            note = "the backbone has no ModelConfig, so its FLOPs are unknown"
        self._info = {"device": name, "devices": self._world, "precision": str(trainer.precision),
                      "peak_tflops": self._peak, "peak_source": source, "note": note}

    # ---- measuring --------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # The step training starts at (after a resume restored it; 0 otherwise) has no window
        # of its own to log: the micro-batches accumulating towards the next step would
        # otherwise be logged as one at their first batch end.
        self._logged_step = trainer.global_step
        self._start_step = trainer.global_step

    def _sync_now(self) -> float:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        return time.perf_counter()

    def _warm(self) -> bool:
        """Whether the current batch belongs to one of the first `warmup_steps` steps."""
        return self._batch_step - self._start_step < self.warmup_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._pending = batch
        self._batch_step = trainer.global_step
        if self._first_start is None:
            self._first_start = time.perf_counter()
            if not self._warm():
                self._last = self._first_start  # no warm-up: the first batch is measured too
        elif self._last is None and self._seen:
            # After a pause (validation, a checkpoint save): measure from this batch on.
            self._last = time.perf_counter()
        elif self._in_warmup and not self._warm() and self._last is not None:
            # The first measured batch: on CUDA, the warm-up's queued work (compilation's
            # first runs) is waited for and left in the warm-up.
            now = self._sync_now()
            self._warmup.add(now - self._last)
            self._last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._accounted_by_save:  # a save in an earlier callback's hook took it
            self._accounted_by_save = False
            return
        self._account(trainer, batch)

    def _account(self, trainer, batch: Any) -> None:
        """Add the batch that just ended to the windows; log when a logging step ends."""
        self._pending = None
        shapes = batch_shapes(batch)
        if shapes is None and not self._unknown_batch:
            self._unknown_batch = True
            self._info["note"] = "; ".join(filter(None, [self._info.get("note"), (
                "training batches without input_ids or src_ids/tgt_in: tokens, samples and "
                "FLOPs unknown, only the time is measured")]))
        B, T, S = shapes if shapes else (0, 0, None)
        # This rank's batch; the ranks' counts are summed when a window is logged.
        tokens = B * (T + (S or 0))
        # Before the clock is read: a new shape's count is computed (once) outside any window.
        flops = self._flops.batch(B, T, S) if (self._flops and shapes) else 0.0
        if self._teacher_flops is not None and flops:
            flops += self._teacher_flops.batch(B, T, S)
        now = time.perf_counter()
        self._seen += 1
        self._in_warmup = self._warm() or self._last is None
        if self._in_warmup:
            start = next((t for t in (self._last, self._first_start) if t is not None), now)
            self._warmup.add(now - start, tokens, B, flops, 1)
            self._last = now
            return
        for window in (self._window, self._total):
            window.add(now - self._last, tokens, B, flops, 1)
        self._last = now
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 and step != self._logged_step:
            self._logged_step = step
            self._catch_up()
            self._log(trainer, self._job_windows(trainer, [self._window])[0])
            self._window = _Window()

    def _job_windows(self, trainer, windows: list[_Window]) -> list[_Window]:
        """`windows` with the job's counts: each rank's summed in one all-reduce (every rank
        calls this at the same step); this rank's clock. One host read, at a logging step, where
        a GPU is synchronised anyway."""
        if self._world == 1 or not torch.distributed.is_initialized():
            return windows
        counts = torch.tensor([[w.tokens, w.samples, w.flops] for w in windows],
                              dtype=torch.float64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(counts)
        return [w.counted(*row) for w, row in zip(windows, counts.tolist())]

    def _catch_up(self) -> None:
        """On CUDA, wait for the queued work so the windows end where the compute ends."""
        if self._cuda is None or self._last is None:
            return
        now = self._sync_now()
        windows = (self._warmup,) if self._in_warmup else (self._window, self._total)
        for window in windows:
            window.add(now - self._last)
        self._last = now

    def _pause(self) -> None:
        """Close the training interval: what follows until the next batch is not training."""
        self._catch_up()
        self._last = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._pause()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Called before the file is written (ModelCheckpoint after validation, ResumeCheckpoint
        # every N steps): writing it is not training time. A save from a callback's
        # `on_train_batch_end` that runs before this one's (ResumeCheckpoint in the default
        # list) comes while the batch is still unaccounted: it ended when the save began.
        if trainer.state.fn == TrainerFn.FITTING:
            if self._pending is not None:
                self._account(trainer, self._pending)
                self._accounted_by_save = True
            self._pause()

    def on_train_end(self, trainer, pl_module) -> None:
        self._catch_up()
        total, warmup = self._job_windows(trainer, [self._total, self._warmup])
        self._job = (total, warmup)

    # ---- reporting --------------------------------------------------------------------------
    def _rates(self, window: _Window) -> dict[str, float | None]:
        if window.seconds <= 0 or self._unknown_batch:  # unknown: a zero would read as measured
            return dict.fromkeys(METRICS)
        tflops = window.flops / window.seconds / 1e12 if self._flops else None
        mfu = tflops / (self._peak * self._world) if (tflops is not None and self._peak) else None
        return {"tokens_per_sec": window.tokens / window.seconds,
                "samples_per_sec": window.samples / window.seconds,
                "tflops_per_sec": tflops, "mfu": mfu}

    def _log(self, trainer: L.Trainer, window: _Window) -> None:
        values = {f"throughput/{k}": v for k, v in self._rates(window).items() if v is not None}
        if values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def summary(self) -> dict[str, Any] | None:
        """Means over the run's measured batches (the warm-up ones when nothing else ran);
        None before any training batch."""
        note = self._info.get("note")
        if self._job is not None:
            total, warmup = self._job
        else:  # training stopped before the ranks' counts were summed: rank zero's × ranks
            total, warmup = self._total.scaled(self._world), self._warmup.scaled(self._world)
            if self._world > 1:
                note = "; ".join(filter(None, [note, (
                    "training ended early: counts are rank zero's batches × the number of ranks")]))
        window = total
        if window.batches == 0:
            if warmup.batches == 0:
                return None
            window = warmup
            note = "; ".join(filter(None, [note, "only warm-up batches ran: includes warm-up"]))
        out: dict[str, Any] = dict(self._rates(window))
        out.update(self._info, note=note, batches_measured=window.batches,
                   seconds_measured=window.seconds,
                   flops_per_token=window.flops / window.tokens if window.tokens and self._flops else None)
        return out


def run_throughput(trainer: L.Trainer) -> dict[str, Any] | None:
    """The ThroughputMonitor's summary of this trainer's fit, if the run has one."""
    for callback in trainer.callbacks:
        if isinstance(callback, ThroughputMonitor):
            return callback.summary()
    return None
