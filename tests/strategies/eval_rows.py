"""A test-only callback: every rank writes the rows (real tokens only) of the validation batches
it ran to `<dirpath>/eval_rank<r>.json`, so a test can check how the ranks shared the split."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import lightning as L


class DumpEvalRows(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.batches: list[list[list[int]]] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.batches = []  # the last validation's batches

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        ids, mask = (batch["src_ids"], batch["src_mask"]) if "src_ids" in batch else (
            batch["input_ids"], batch["attention_mask"])
        self.batches.append([row[keep.bool()].tolist() for row, keep in zip(ids, mask)])

    def on_validation_epoch_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"eval_rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


class OracleDecoding(L.Callback):
    """Replaces the decoded outputs of validation's generation (which still runs) with the
    reference text for about two thirds of the items, chosen by a hash of the reference, and
    with "" for the rest: exact match, BLEU and chrF then depend only on which items were
    scored, not on the (untrained) model's outputs."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        targets = batch["target_text"]

        def decode_batch(ids: list[list[int]]) -> list[str]:
            assert len(ids) == len(targets)
            return [t if zlib.crc32(t.encode()) % 3 else "" for t in targets]

        pl_module.tokenizer.decode_batch = decode_batch

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
