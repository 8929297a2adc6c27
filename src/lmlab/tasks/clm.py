"""`task=clm`: next-token prediction, with exact-match evaluation on prompt → target data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from lmlab.checkpoint import METADATA_KEY, tokenizer_files
from lmlab.data.collate import IGNORE_INDEX
from lmlab.models.generation import generate
from lmlab.tokenizers import Tokenizer


def _normalise(text: str) -> str:
    return " ".join(text.split())


def split_weight_decay(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm weights and 1-d parameters are not decayed."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class CausalLMTask(L.LightningModule):
    """Wraps a decoder backbone with the causal-LM objective and its metrics.

    Logs `train/loss`, `{val,test}/loss`, `{val,test}/ppl`, and on batches that carry prompts
    (`prompt_ids`, `target_text`, `task`), exact-match accuracy `{val,test}/acc` overall and
    `{val,test}/acc/<task>` per task, scored by greedy generation with the KV cache.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        weight_decay: float = 0.1,
        label_smoothing: float = 0.0,
        eval_generation: bool = True,
        max_new_tokens: int = 32,
        checkpoint_metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.eval_generation = eval_generation
        self.max_new_tokens = max_new_tokens
        self.checkpoint_metadata = dict(checkpoint_metadata or {})
        # Counted on device and checkpointed, so resumed runs report the true total.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.eval_loss_sum = SumMetric()
        self.eval_token_count = SumMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(input_ids, attention_mask=attention_mask)

    def _loss(self, batch: dict, reduction: str = "mean") -> torch.Tensor:
        # Batches are right-padded, and a causal model never lets a real token see a later pad,
        # so no mask is needed: that keeps attention on the fused is_causal path.
        logits = self(batch["input_ids"])
        return F.cross_entropy(
            logits.float().flatten(0, 1),
            batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing if reduction == "mean" else 0.0,
            reduction=reduction,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.tokens_seen += batch["attention_mask"].sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> None:
        token_losses = self._loss(batch, reduction="sum")
        n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        self.eval_loss_sum.update(token_losses)
        self.eval_token_count.update(n_tokens)
        if self.eval_generation and "prompt_ids" in batch:
            self._exact_match(batch, stage)

    def _exact_match(self, batch: dict, stage: str) -> None:
        new_tokens = generate(
            self.backbone,
            batch["prompt_ids"],
            prompt_mask=batch["prompt_mask"],
            max_new_tokens=self.max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            vocab_size=self.tokenizer.vocab_size,
        )
        predictions = self.tokenizer.decode_batch(new_tokens.tolist())
        correct = [_normalise(p) == _normalise(t) for p, t in zip(predictions, batch["target_text"])]
        n = len(correct)
        self.log(f"{stage}/acc", sum(correct) / n, batch_size=n, on_epoch=True, on_step=False, prog_bar=True)
        by_task: dict[str, list[bool]] = {}
        for task, ok in zip(batch["task"], correct):
            by_task.setdefault(task, []).append(ok)
        for task, oks in by_task.items():
            self.log(f"{stage}/acc/{task}", sum(oks) / len(oks), batch_size=len(oks), on_epoch=True, on_step=False)

    def _eval_epoch_end(self, stage: str) -> None:
        loss = self.eval_loss_sum.compute() / self.eval_token_count.compute().clamp_min(1)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=50.0)))
        self.eval_loss_sum.reset()
        self.eval_token_count.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer_files" not in self.checkpoint_metadata:
            self.checkpoint_metadata["tokenizer_files"] = tokenizer_files(self.tokenizer)
        checkpoint[METADATA_KEY] = self.checkpoint_metadata

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(split_weight_decay(self.backbone, self.weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
