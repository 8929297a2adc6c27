"""`task=mlm`: BERT masked-language modelling on text windows, masked on the fly."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.data.collate import IGNORE_INDEX
from lmlab.errors import ConfigError
from lmlab.tasks.base import EvalMeters, LMTask
from lmlab.tasks.masking import bert_mask, seeded_generator
from lmlab.tokenizers import Tokenizer

# Separate seed streams for training and each evaluation split.
STREAMS = {"train": 0, "val": 1, "test": 2}
# Lightning says so whenever a LightningModule defines a transfer hook and a datamodule is in
# use; the module's hook running is what the task wants.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


class MaskedLMTask(LMTask):
    """Wraps an encoder backbone (`forward(input_ids, attention_mask) -> hidden`,
    `mlm_logits(hidden)`) with the masked-LM objective.

    Reads text batches (their next-token `labels` are ignored) and masks them itself, so one
    corpus serves clm and mlm alike. Every mask is drawn from a generator seeded by (seed,
    split, step or batch index): training is exactly reproducible on resume, and validation
    masks the same positions at every evaluation, so numbers are comparable across a run.

    Logs `train/loss`, `{val,test}/loss`, `{val,test}/ppl` (over masked tokens) and
    `{val,test}/acc` (masked-token accuracy); `@<len>` variants for extra evaluation lengths.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
        weight_decay: float = 0.01,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        seed: int = 0,
        expert_load_every: int = 50,
    ):
        super().__init__(backbone, tokenizer, optimizer, scheduler, checkpoint_metadata, weight_decay,
                         expert_load_every)
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError("task.mask_prob", mask_prob, reason="must be in (0, 1)")
        for name, value in (("mask_token_prob", mask_token_prob), ("random_token_prob", random_token_prob)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"task.{name}", value, reason="must be in [0, 1]")
        if mask_token_prob + random_token_prob > 1.0:
            raise ConfigError("task.random_token_prob", random_token_prob,
                              reason=f"task.mask_token_prob + task.random_token_prob = "
                              f"{mask_token_prob + random_token_prob} exceeds 1")
        if tokenizer.vocab_size <= tokenizer.num_special_tokens:
            raise ConfigError("tokenizer.vocab_size", tokenizer.vocab_size,
                              reason="mlm needs ordinary tokens besides the specials to replace with")
        self.mask_prob = mask_prob
        # The MLM head (and the last layer after its attention, `flops_row_modules`) runs on
        # the chosen positions only (ThroughputMonitor's FLOPs).
        self.flops_head_fraction = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob
        self.seed = seed
        self.eval_meters = EvalMeters(("loss", "acc"))

    def mask(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        return bert_mask(
            batch["input_ids"], batch.get("attention_mask"), tok.mask_id, tok.num_special_tokens, tok.vocab_size,
            self.mask_prob, self.mask_token_prob, self.random_token_prob, generator,
        )

    def masked_logits(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(logits over the real vocabulary, original ids) at the chosen positions only: the
        head runs on the ~15% of positions that carry a loss, not on every token."""
        masked_ids, labels = self.mask(batch, generator)
        chosen = (labels != IGNORE_INDEX).flatten()
        positions = chosen.nonzero().squeeze(1)  # on a GPU: a host read (see on_before_batch_transfer)
        return self._logits_at(masked_ids, self._backbone_mask(batch), positions), labels.flatten()[positions]

    @staticmethod
    def _backbone_mask(batch: dict) -> Tensor | None:
        """The attention mask the backbone gets: none for a batch the transfer hook found
        without padding."""
        return None if batch.get("mlm_unpadded") else batch.get("attention_mask")

    def _logits_at(self, masked_ids: Tensor, attention_mask: Tensor | None, positions: Tensor) -> Tensor:
        if getattr(self.backbone, "accepts_output_rows", False):
            # The last layer computes only these positions after its attention.
            hidden = self.run_backbone(masked_ids, attention_mask, output_rows=positions)
        else:
            hidden = self.run_backbone(masked_ids, attention_mask).flatten(0, 1)[positions]
        # A 2-d [n, d_model] input: indexing a leading dim of 1 back out ([None] ... [0]) would
        # cost a zero-filled [1, n, vocab] gradient and a copy into it every step.
        logits = self.backbone.mlm_logits(hidden)
        return logits[:, : self.tokenizer.vocab_size].float()

    @property
    def flops_row_modules(self) -> tuple[str, ...]:
        """Backbone modules that run on the masked positions only (`flops_head_fraction`
        of them), as the output layer does (ThroughputMonitor's FLOPs)."""
        if not getattr(self.backbone, "accepts_output_rows", False):
            return ()
        return self.backbone.output_row_modules()

    def train_generator(self, step: int, batch_idx: int) -> torch.Generator:
        """The masks of training step `step`'s batch `batch_idx`: reproducible on resume."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        return seeded_generator(self.seed, STREAMS["train"], step, batch_idx % accumulate, rank)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches are masked here, on the host, before Lightning moves them to the
        device: the chosen positions are then known without reading the device (boolean
        indexing of device tensors waits for the GPU) and the masked batch travels like the
        rest, page-locked on a GPU run so the copy does not wait either. The same generator
        as `training_step`'s own masking, so the masks are the same either way.

        Every batch (evaluation too) gets `mlm_unpadded`: for a batch without padding (packed
        text windows: every batch of `data=text`) the backbone is called without the all-ones
        attention mask, so attention takes SDPA's unmasked kernels (flash or cuDNN on a GPU, where a mask
        means the slower memory-efficient kernel; on a CPU the flash kernel without a mask
        term, ~10 % faster). Decided here on the host copy, so it reads no device value."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return batch
        mask = batch.get("attention_mask")
        batch = {**batch, "mlm_unpadded": mask is None or (mask.device.type == "cpu" and bool(mask.all()))}
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return batch
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1  # the index training_step gets
        masked_ids, labels = self.mask(batch, self.train_generator(trainer.global_step, batch_idx))
        positions = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        masking = {"mlm_input_ids": masked_ids, "mlm_positions": positions,
                   "mlm_targets": labels.flatten()[positions]}
        if trainer.strategy.root_device.type == "cuda":
            masking = {k: v.pin_memory() for k, v in masking.items()}
        return {**batch, **masking, "mlm_step": (trainer.global_step, batch_idx)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if batch.get("mlm_step") == (self.global_step, batch_idx):  # masked on the host
            logits = self._logits_at(batch["mlm_input_ids"], self._backbone_mask(batch), batch["mlm_positions"])
            targets = batch["mlm_targets"]
        else:  # a batch that did not pass through Lightning's transfer hooks
            logits, targets = self.masked_logits(batch, self.train_generator(self.global_step, batch_idx))
        # A sum over zero chosen tokens is 0 with a gradient path, where a mean would be NaN.
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(targets.numel(), 1)
        self.count_tokens(batch["attention_mask"])
        return self.training_loss(loss, batch["input_ids"].shape[0])

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict, batch_idx: int, stage: str, dataloader_idx: int) -> None:
        # Each row's masks are seeded by its index in the split, so the numbers do not depend
        # on how the split was batched or shared out across ranks (lmlab.data.eval_sharding).
        rows = batch.get("eval_index")
        generator = ([seeded_generator(self.seed, STREAMS[stage], dataloader_idx, index) for index in rows]
                     if rows is not None else seeded_generator(self.seed, STREAMS[stage], dataloader_idx, batch_idx))
        logits, targets = self.masked_logits(batch, generator)
        n = torch.tensor(targets.numel(), device=logits.device)
        self.eval_meters.update(
            dataloader_idx, batch["input_ids"].shape[1],
            loss=(F.cross_entropy(logits, targets, reduction="sum"), n),
            acc=((logits.argmax(-1) == targets).sum(), n),
        )

    def _eval_epoch_end(self, stage: str) -> None:
        for suffix, values in self.eval_meters.results().items():
            self.log(f"{stage}/loss{suffix}", values["loss"], prog_bar=not suffix)
            self.log(f"{stage}/ppl{suffix}", torch.exp(values["loss"].clamp(max=50.0)))
            self.log(f"{stage}/acc{suffix}", values["acc"], prog_bar=not suffix)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test", dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
