"""Tokens per second, logged as `throughput/tokens_per_sec` without a device sync per step."""

from __future__ import annotations

import time

import lightning as L


class ThroughputMonitor(L.Callback):
    """Counts input positions (shape only, so no host-device sync) and logs the rate every
    `log_every_n_steps` optimizer steps."""

    def __init__(self, log_every_n_steps: int = 25):
        self.log_every_n_steps = log_every_n_steps
        self._tokens = 0
        self._samples = 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Shapes only (no device sync): decoder/encoder batches carry input_ids, seq2seq both sides.
        ids = [batch[k] for k in ("input_ids", "src_ids", "tgt_in") if k in batch]
        self._tokens += sum(t.numel() for t in ids)
        self._samples += ids[0].shape[0] if ids else 0
        if trainer.global_step % self.log_every_n_steps == 0 and self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            if elapsed > 0:
                pl_module.log("throughput/tokens_per_sec", self._tokens * trainer.world_size / elapsed)
                pl_module.log("throughput/samples_per_sec", self._samples * trainer.world_size / elapsed)
            self._tokens = self._samples = 0
            self._t0 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        # Evaluation time is not training throughput: restart the window afterwards.
        self._t0 = None
        self._tokens = self._samples = 0
