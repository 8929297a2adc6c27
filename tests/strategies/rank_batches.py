"""A test-only callback: every rank writes the shapes and real-token counts of its training
batches to `<dirpath>/batches_rank<r>.json`, so a test can check job-wide counts against them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class DumpRankBatches(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.batches: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = batch["input_ids"]
        self.batches.append({"B": ids.shape[0], "T": ids.shape[1],
                             "real": int(batch["attention_mask"].sum())})

    def on_train_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"batches_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.batches))
