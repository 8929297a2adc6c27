"""`task=classify`: a linear head on pooled hidden states, for encoders and decoders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lmlab.errors import ConfigError, check_choice
from lmlab.tasks.base import LMTask, backbone_family

POOLINGS = ("auto", "cls", "mean", "last")


def pool_hidden(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """[B, T, d] hidden states of right-padded sequences → [B, d].

    cls: the first position (the <bos> every example starts with; an encoder sees the whole
    text from there). last: the last real token (a causal decoder has read everything only
    there). mean: the average over real tokens.
    """
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if pooling == "last":
        last = attention_mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


class ClassificationTask(LMTask):
    """Backbone `.hidden(input_ids, attention_mask) -> [B, T, d]`, pooled, then dropout and the
    `classifier` Linear(d_model → num_classes).

    pooling "auto" is cls for encoders and last (last real token) for decoders. The head is
    created after any PEFT method has frozen the backbone, and always trains.
    Logs `train/loss`, `{val,test}/loss`, `{val,test}/acc` and macro-F1 `{val,test}/f1`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
        num_classes: int | None = None,
        pooling: str = "auto",
        classifier_dropout: float = 0.1,
        label_smoothing: float = 0.0,
        weight_decay: float = 0.01,
        expert_load_every: int = 50,
    ):
        super().__init__(backbone, tokenizer, optimizer, scheduler, checkpoint_metadata, weight_decay,
                         expert_load_every)
        if num_classes is None or num_classes < 2:
            raise ConfigError("task.num_classes", num_classes,
                              reason="needs >= 2 classes (null = from the data's labels)")
        check_choice("task.pooling", pooling, POOLINGS)
        if not 0.0 <= classifier_dropout < 1.0:
            raise ConfigError("task.classifier_dropout", classifier_dropout, reason="must be in [0, 1)")
        self.family = backbone_family(backbone)
        self.pooling = ("cls" if self.family == "encoder" else "last") if pooling == "auto" else pooling
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        d_model = backbone.config.d_model
        self.classifier_dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(d_model, num_classes)
        self.classifier.requires_grad_(True)
        # The backbone's LM/MLM head never runs here (ThroughputMonitor's FLOPs).
        self.flops_head_fraction = 0.0
        self.eval_metrics = nn.ModuleDict({
            stage: nn.ModuleDict({
                "loss": MeanMetric(),
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            })
            for stage in ("val", "test")
        })

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class logits [B, num_classes]."""
        # A causal decoder's real tokens never see the right padding, so it needs no mask
        # (which keeps attention on the fused causal path); an encoder must mask the pads.
        mask = attention_mask if self.family != "decoder" else None
        backbone = self.step_backbone()  # compiled in training under model.compile
        rows = self._pooled_rows(attention_mask)
        if rows is not None:
            # One position a sequence is pooled: the last layer computes only it after its
            # attention.
            pooled = backbone.hidden(input_ids, mask, output_rows=rows)
        else:
            pooled = pool_hidden(backbone.hidden(input_ids, mask), attention_mask, self.pooling)
        return self.classifier(self.classifier_dropout(pooled)).float()

    def _pooled_rows(self, attention_mask: Tensor) -> Tensor | None:
        """For cls and last pooling on a backbone with `output_rows`, the pooled position of
        each sequence as an index into the B·T positions (`pool_hidden`'s, computed on the
        device: no host read); None otherwise (mean pooling reads every position)."""
        if not self._pools_one_row:
            return None
        B, T = attention_mask.shape
        rows = torch.arange(B, device=attention_mask.device) * T
        if self.pooling == "last":
            rows = rows + attention_mask.long().sum(1).clamp_min(1) - 1
        return rows

    @property
    def _pools_one_row(self) -> bool:
        return self.pooling in ("cls", "last") and getattr(self.backbone, "accepts_output_rows", False)

    @property
    def flops_row_modules(self) -> tuple[str, ...]:
        """Backbone modules that run on the pooled position only (ThroughputMonitor's FLOPs)."""
        return self.backbone.output_row_modules() if self._pools_one_row else ()

    # One pooled position a sequence (with `flops_row_modules`).
    flops_rows_per_sequence = 1

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        self.count_tokens(batch["attention_mask"])
        return self.training_loss(loss, batch["labels"].shape[0])

    def _eval_step(self, batch: dict, stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        metrics = self.eval_metrics[stage]
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        metrics["loss"].update(losses)
        metrics["acc"].update(logits, batch["labels"])
        metrics["f1"].update(logits, batch["labels"])

    def _eval_epoch_end(self, stage: str) -> None:
        for name, metric in self.eval_metrics[stage].items():
            self.log(f"{stage}/{name}", metric.compute(), prog_bar=name != "f1")
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
