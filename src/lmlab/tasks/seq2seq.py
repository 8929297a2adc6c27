"""`task=seq2seq`: teacher forcing with label smoothing; evaluation by decoding (greedy or
beam) scored with BLEU, chrF and exact match."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.data.collate import IGNORE_INDEX
from lmlab.data.eval_sharding import share_of_decoding
from lmlab.errors import ConfigError
from lmlab.models.layers.fused_cross_entropy import fusable_head
from lmlab.models.seq2seq_generation import generate_seq2seq
from lmlab.tasks.base import LMTask, RatioMeter
from lmlab.tasks.text_metrics import accuracy_by_task, corpus_scores, gather_objects, normalise
from lmlab.tokenizers import Tokenizer


class Seq2SeqTask(LMTask):
    """Wraps an encoder-decoder (`forward(src_ids, src_mask, tgt_ids) -> logits`) for seq2seq
    batches (`src_ids`, `src_mask`, `tgt_in`, `tgt_out`, `target_text`, optionally `task`).

    Training: cross-entropy of `tgt_out` with `label_smoothing`. Evaluation: `{val,test}/loss`
    and `/ppl` (teacher-forced, unsmoothed), then the sources are decoded with
    `generate_seq2seq` (`num_beams` 1 = greedy) and compared to the reference strings:
    corpus `{val,test}/bleu` and `/chrf` (sacrebleu, detokenised text from tokenizer.decode),
    exact match `{val,test}/acc`, and `{val,test}/acc/<task>` for batches that name tasks.
    Validation decodes only the first `eval_max_batches_decoded` batches (null = all; with
    several ranks, rounded up to a multiple of their number): decoding the whole of a real
    validation set at every check is slow on a CPU; test decodes all.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
        weight_decay: float = 0.01,
        label_smoothing: float = 0.1,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int | None = None,
        eval_generation: bool = True,
        eval_max_batches_decoded: int | None = None,
        expert_load_every: int = 50,
    ):
        super().__init__(backbone, tokenizer, optimizer, scheduler, checkpoint_metadata, weight_decay,
                         expert_load_every)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError("task.label_smoothing", label_smoothing, reason="must be in [0, 1)")
        if num_beams < 1:
            raise ConfigError("task.num_beams", num_beams, reason="must be >= 1 (1 = greedy)")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError("task.max_new_tokens", max_new_tokens, reason="must be >= 1 or null (from the data)")
        if eval_max_batches_decoded is not None and eval_max_batches_decoded < 0:
            raise ConfigError("task.eval_max_batches_decoded", eval_max_batches_decoded,
                              reason="must be >= 0 or null (all)")
        self.label_smoothing = label_smoothing
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        # Without a hint from the data, allow the longest sequence the model was built for.
        self.max_new_tokens = max_new_tokens or getattr(backbone.config, "max_seq_len", 64)
        self.eval_generation = eval_generation
        self.eval_max_batches_decoded = eval_max_batches_decoded
        self.eval_loss = RatioMeter()
        self._decoded: dict[str, list] = {"hyp": [], "ref": [], "task": []}

    @property
    def flops_head_fraction(self) -> float:
        """The share of the output layer the training step multiplies (ThroughputMonitor's
        FLOPs): the fused loss uses the real vocabulary's rows only, not the padding's."""
        head = getattr(self.backbone, "lm_head", None)
        if getattr(self.backbone, "accepts_labels", False) and head is not None and fusable_head(head):
            return min(1.0, self.tokenizer.vocab_size / head.weight.shape[0])
        return 1.0

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        return self.run_backbone(src_ids, src_mask, tgt_in)

    def _loss(self, batch: dict, label_smoothing: float, reduction: str) -> Tensor:
        # Only real tokens compete: ids that merely pad the vocabulary get no smoothing mass.
        vocab = self.tokenizer.vocab_size
        if getattr(self.backbone, "accepts_labels", False):
            # lmlab's encoder-decoder computes the loss itself: the output layer and the loss
            # fused in row chunks, without the [B, T, V] fp32 logits.
            return self.run_backbone(
                batch["src_ids"], batch["src_mask"], batch["tgt_in"], labels=batch["tgt_out"],
                ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction=reduction,
                loss_vocab=vocab)
        logits = self(batch["src_ids"], batch["src_mask"], batch["tgt_in"])
        logits = logits[..., :vocab].float()
        return F.cross_entropy(
            logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing, reduction=reduction,
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch, self.label_smoothing, "mean")
        self.count_tokens(batch["src_mask"], batch["tgt_mask"])
        return self.training_loss(loss, batch["src_ids"].shape[0])

    # -- evaluation ---------------------------------------------------------------------------
    def decode_batch(self, batch: dict) -> list[str]:
        """The model's output for each source, as detokenised text."""
        new_tokens = generate_seq2seq(
            self.backbone, batch["src_ids"], batch["src_mask"],
            max_new_tokens=self.max_new_tokens,
            bos_id=self.tokenizer.bos_id,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            vocab_size=self.tokenizer.vocab_size,
        )
        return self.tokenizer.decode_batch(new_tokens.tolist())

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        token_losses = self._loss(batch, 0.0, "sum")
        self.eval_loss.update(token_losses, (batch["tgt_out"] != IGNORE_INDEX).sum())
        # Each rank decodes its share of the first batches; all ranks stop at the same index.
        world = getattr(self._trainer, "world_size", 1)
        limit = share_of_decoding(self.eval_max_batches_decoded, world) if stage == "val" else None
        if not self.eval_generation or (limit is not None and batch_idx >= limit):
            return
        self._decoded["hyp"].extend(self.decode_batch(batch))
        self._decoded["ref"].extend(batch["target_text"])
        self._decoded["task"].extend(batch.get("task") or [""] * len(batch["target_text"]))

    def _eval_epoch_end(self, stage: str) -> None:
        loss = self.eval_loss.compute()
        self.eval_loss.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=50.0)))
        decoded = gather_objects(list(zip(*(self._decoded[k] for k in ("hyp", "ref", "task")))))
        self._decoded = {"hyp": [], "ref": [], "task": []}
        if not decoded:
            return
        hyp, ref, tasks = (list(column) for column in zip(*decoded))
        for name, value in corpus_scores(hyp, ref).items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "bleu")
        correct = [normalise(h) == normalise(r) for h, r in zip(hyp, ref)]
        self.log(f"{stage}/acc", sum(correct) / len(correct))
        for task, acc in accuracy_by_task(list(zip(tasks, correct))).items():
            self.log(f"{stage}/acc/{task}", acc)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
