"""`task=clm`: next-token prediction, with exact-match evaluation on prompt → target data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmlab.data.collate import IGNORE_INDEX
from lmlab.models.generation import generate
from lmlab.models.layers.fused_cross_entropy import plain_cross_entropy
from lmlab.tasks.base import EvalMeters, LMTask, split_weight_decay
from lmlab.tasks.text_metrics import accuracy_by_task, gather_objects, normalise
from lmlab.tokenizers import Tokenizer

__all__ = ["CausalLMTask", "causal_lm_loss", "split_weight_decay"]


def causal_lm_loss(backbone: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """fp32 next-token cross-entropy of `backbone` (the step's module: eager or compiled) on
    `input_ids` against `labels` (shifted by the collator; IGNORE_INDEX where nothing is
    predicted). Backbones that compute the loss themselves (`accepts_labels`: lmlab's decoder,
    with its fused output layer + loss) get the labels; others (HF backbones) give logits.

    Batches are right-padded, and a causal model never lets a real token see a later pad, so
    no attention mask is passed: that keeps attention on the fused is_causal path.
    """
    if getattr(backbone, "accepts_labels", False):
        return backbone(input_ids, labels=labels, ignore_index=IGNORE_INDEX,
                        label_smoothing=label_smoothing, reduction=reduction)
    return plain_cross_entropy(backbone(input_ids), labels, IGNORE_INDEX, label_smoothing, reduction)


class CausalLMTask(LMTask):
    """Wraps a decoder backbone with the causal-LM objective and its metrics.

    Logs `train/loss`, `{val,test}/loss`, `{val,test}/ppl`, and on batches that carry prompts
    (`prompt_ids`, `target_text`, `task`), exact-match accuracy `{val,test}/acc` overall and
    `{val,test}/acc/<task>` per task, scored by greedy generation with the KV cache.
    Extra evaluation dataloaders (text data with `eval_seq_lens`) serve longer windows; their
    loss and perplexity are logged as `{val,test}/loss@<len>` and `{val,test}/ppl@<len>`.
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
        expert_load_every: int = 50,
    ):
        super().__init__(backbone, tokenizer, optimizer, scheduler, checkpoint_metadata, weight_decay,
                         expert_load_every)
        self.label_smoothing = label_smoothing
        self.eval_generation = eval_generation
        self.max_new_tokens = max_new_tokens
        self.eval_meters = EvalMeters(("loss",))
        self._matches: list[tuple[str, bool]] = []  # (task, exact match) of each scored prompt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.run_backbone(input_ids, attention_mask=attention_mask)

    def _loss(self, batch: dict, reduction: str = "mean") -> torch.Tensor:
        return causal_lm_loss(self.step_backbone(), batch["input_ids"], batch["labels"],
                              self.label_smoothing if reduction == "mean" else 0.0, reduction)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.count_tokens(batch["attention_mask"])
        return self.training_loss(loss, batch["input_ids"].shape[0])

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str, dataloader_idx: int = 0) -> None:
        token_losses = self._loss(batch, reduction="sum")
        n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        self.eval_meters.update(dataloader_idx, batch["input_ids"].shape[1], loss=(token_losses, n_tokens))
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
        tasks = batch.get("task") or [""] * len(predictions)  # parallel corpora name no tasks
        self._matches.extend((task, normalise(p) == normalise(t))
                             for p, t, task in zip(predictions, batch["target_text"], tasks))

    def _eval_epoch_end(self, stage: str) -> None:
        for suffix, values in self.eval_meters.results().items():
            self.log(f"{stage}/loss{suffix}", values["loss"], prog_bar=not suffix)
            self.log(f"{stage}/ppl{suffix}", torch.exp(values["loss"].clamp(max=50.0)))
        if self.eval_generation:
            # Each rank scored its share of the prompts (lmlab.data.eval_sharding).
            matches, self._matches = gather_objects(self._matches), []
            if matches:
                self.log(f"{stage}/acc", sum(ok for _, ok in matches) / len(matches), prog_bar=True)
                for task, acc in accuracy_by_task(matches).items():
                    self.log(f"{stage}/acc/{task}", acc)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
