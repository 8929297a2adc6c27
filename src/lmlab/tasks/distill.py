"""`task=distill`: knowledge distillation from a frozen teacher (Hinton et al. 2015).

    loss = α · CE(student, labels) + (1 − α) · T² · KL(teacher_T ‖ student_T)

where `_T` are the softmaxes at temperature T over the real vocabulary (ids that only pad the
embedding excluded), and the KL is summed over the vocabulary and averaged over the tokens the
CE counts (a prompt → target example: the target and `<eos>`). T² keeps the soft term's
gradients on the scale of the hard term's as T grows. Both terms are logged
(`train/ce`, `train/kl`); `train/loss` is the total.

The teacher is an lmlab checkpoint (`teacher=<ckpt>`) of the student's family; it brings its own
architecture and weights (any size), and its tokenizer becomes the run's (the logits must mean
the same ids), just as `init_from` does. It runs in eval mode under `no_grad` and is **not part
of the task's modules**: it is not trained, not counted in the parameters, and not saved in the
student's checkpoints — they hold the student only, so they load as `init_from` and resume
(a resumed run reloads the teacher from `teacher=`).

Decoders distill with `task=clm`'s batches and evaluation (`DistillCausalLMTask`),
encoder-decoders with `task=seq2seq`'s (`DistillSeq2SeqTask`); `distillation_task` picks by
the backbone's family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.checkpoint import InitSource, load_init_source
from lmlab.data.collate import IGNORE_INDEX
from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, build_backbone
from lmlab.tasks.base import backbone_family
from lmlab.tasks.clm import CausalLMTask
from lmlab.tasks.seq2seq import Seq2SeqTask
from lmlab.tokenizers import Tokenizer


def load_teacher(path: str | None, student: ModelConfig) -> InitSource:
    """The teacher checkpoint's architecture, weights and tokenizer; before any data is read."""
    if not path:
        raise ConfigError("teacher", path, reason="task=distill needs teacher=<checkpoint of a trained run>")
    try:
        source = load_init_source(path)
    except ConfigError as err:  # reported under the field the user set
        raise ConfigError("teacher", path, err.valid, err.reason) from None
    family = source.model_config.get("family", "decoder")
    if family != student.family:
        raise ConfigError("teacher", path, [f"a {student.family} checkpoint"],
                          f"the teacher is a {family} and the student (model.family) a {student.family}: "
                          "distillation compares their outputs token by token, so they must be one family")
    return source


def teacher_for(task_name: str, task_kwargs: dict[str, Any], top_level: str | None,
                student: ModelConfig) -> InitSource | None:
    """The run's teacher: loaded for task=distill, refused for any other task."""
    if task_name == "distill":
        return load_teacher(task_kwargs.get("teacher"), student)
    if top_level:
        raise ConfigError("teacher", top_level, ["null"], f"only task=distill uses a teacher (task={task_name})")
    return None


def _same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    if a.vocab_size != b.vocab_size:
        return False
    return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def build_teacher(source: InitSource, tokenizer: Tokenizer) -> nn.Module:
    """The frozen teacher backbone; its vocabulary must be the run's tokenizer's."""
    if not _same_vocabulary(source.tokenizer, tokenizer):
        raise ConfigError(
            "teacher", str(source.path), [f"a checkpoint with the run's tokenizer ({tokenizer.vocab_size} ids)"],
            f"the teacher's tokenizer ({source.tokenizer.vocab_size} ids) differs from the student's "
            f"({tokenizer.vocab_size} ids, from init_from or the resumed checkpoint): its logits would "
            "mean other tokens")
    config = ModelConfig.from_dict(source.model_config)
    teacher = build_backbone(config)
    return source.load_into(teacher)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float,
                    vocab_size: int) -> Tensor:
    """KL(teacher_T ‖ student_T) summed over the vocabulary, averaged over counted tokens.

    Computed at every position and masked, rather than on the counted positions gathered by
    a boolean index, whose size a GPU would have to report to the host first."""
    counted = labels != IGNORE_INDEX
    s = student_logits[..., :vocab_size].float() / temperature
    t = teacher_logits[..., :vocab_size].float() / temperature
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return torch.where(counted, kl, 0.0).sum() / counted.sum().clamp_min(1)


class _Distillation:
    """What both distillation tasks add to their base task (a mixin over LMTask)."""

    def _init_distillation(self, teacher: nn.Module, alpha: float, temperature: float) -> None:
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError("task.alpha", alpha, reason="must be in [0, 1] (1 = CE only, 0 = KL only)")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError("task.temperature", temperature, reason="must be > 0")
        if not isinstance(teacher, nn.Module):
            raise ConfigError("teacher", teacher, reason="must be a checkpoint path (built into a backbone by the run)")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        teacher.eval()
        teacher.requires_grad_(False)
        # Kept out of the module tree: not trained, not counted, not in state_dict/checkpoints.
        object.__setattr__(self, "teacher", teacher)

    def _teacher_logits(self, *inputs: Tensor) -> Tensor:
        if next(self.teacher.parameters()).device != self.device:
            self.teacher.to(self.device)
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(*inputs)

    def _distilled(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, ce: Tensor,
                   batch_size: int) -> Tensor:
        kl = distillation_kl(student_logits, teacher_logits, labels, self.temperature, self.tokenizer.vocab_size)
        self.log("train/ce", ce, batch_size=batch_size)
        self.log("train/kl", kl, batch_size=batch_size)
        return self.alpha * ce + (1.0 - self.alpha) * self.temperature ** 2 * kl


class DistillCausalLMTask(_Distillation, CausalLMTask):
    """`task=distill` for decoders: clm's batches, metrics and generation."""

    def __init__(self, backbone: nn.Module, tokenizer: Tokenizer, optimizer: Callable[..., torch.optim.Optimizer],
                 teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0, **clm_kwargs: Any):
        super().__init__(backbone, tokenizer, optimizer, **clm_kwargs)
        self._init_distillation(teacher, alpha, temperature)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        logits = self(ids)
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                             label_smoothing=self.label_smoothing)
        loss = self._distilled(logits, self._teacher_logits(ids), labels, ce, ids.shape[0])
        self.count_tokens(batch["attention_mask"])
        return self.training_loss(loss, ids.shape[0])


class DistillSeq2SeqTask(_Distillation, Seq2SeqTask):
    """`task=distill` for encoder-decoders: seq2seq's batches, metrics and decoding."""

    def __init__(self, backbone: nn.Module, tokenizer: Tokenizer, optimizer: Callable[..., torch.optim.Optimizer],
                 teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0, **seq2seq_kwargs: Any):
        super().__init__(backbone, tokenizer, optimizer, **seq2seq_kwargs)
        self._init_distillation(teacher, alpha, temperature)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        inputs = (batch["src_ids"], batch["src_mask"], batch["tgt_in"])
        logits = self(*inputs)
        labels = batch["tgt_out"]
        ce = F.cross_entropy(logits[..., : self.tokenizer.vocab_size].float().flatten(0, 1), labels.flatten(),
                             ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        batch_size = batch["src_ids"].shape[0]
        loss = self._distilled(logits, self._teacher_logits(*inputs), labels, ce, batch_size)
        self.count_tokens(batch["src_mask"], batch["tgt_mask"])
        return self.training_loss(loss, batch_size)


def distillation_task(
    backbone: nn.Module,
    tokenizer: Tokenizer,
    optimizer: Callable[..., torch.optim.Optimizer],
    teacher: nn.Module,
    alpha: float = 0.5,
    temperature: float = 2.0,
    scheduler: Callable[..., Any] | None = None,
    checkpoint_metadata: dict[str, Any] | None = None,
    weight_decay: float = 0.1,
    label_smoothing: float = 0.0,
    eval_generation: bool = True,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eval_max_batches_decoded: int | None = None,
    expert_load_every: int = 50,
) -> CausalLMTask | Seq2SeqTask:
    """The distillation task for the backbone's family (see the module docstring); decoding
    fields (`num_beams`, `length_penalty`, `eval_max_batches_decoded`) apply to encoder-decoders."""
    common = dict(scheduler=scheduler, checkpoint_metadata=checkpoint_metadata, weight_decay=weight_decay,
                  label_smoothing=label_smoothing, eval_generation=eval_generation,
                  expert_load_every=expert_load_every)
    if backbone_family(backbone) == "encoder_decoder":
        return DistillSeq2SeqTask(backbone, tokenizer, optimizer, teacher, alpha, temperature,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                                  eval_max_batches_decoded=eval_max_batches_decoded, **common)
    return DistillCausalLMTask(backbone, tokenizer, optimizer, teacher, alpha, temperature,
                               max_new_tokens=max_new_tokens or 32, **common)
