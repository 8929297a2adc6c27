"""LightningModules = objectives. A task knows its backbone family, never Hydra."""

from lmlab.tasks.base import LMTask
from lmlab.tasks.classify import ClassificationTask
from lmlab.tasks.clm import CausalLMTask
from lmlab.tasks.distill import DistillCausalLMTask, DistillSeq2SeqTask, distillation_task
from lmlab.tasks.mlm import MaskedLMTask
from lmlab.tasks.seq2seq import Seq2SeqTask

#: task name → (LightningModule class, backbone families it can serve, data kinds it reads)
TASKS = {
    "clm": (CausalLMTask, ("decoder",), ("pairs", "text")),
    "mlm": (MaskedLMTask, ("encoder",), ("text",)),
    "classify": (ClassificationTask, ("encoder", "decoder"), ("classification",)),
    "seq2seq": (Seq2SeqTask, ("encoder_decoder",), ("seq2seq",)),
    # picks DistillCausalLMTask or DistillSeq2SeqTask by the backbone's family
    "distill": (distillation_task, ("decoder", "encoder_decoder"), ("pairs", "text", "seq2seq")),
}

__all__ = ["TASKS", "CausalLMTask", "ClassificationTask", "DistillCausalLMTask", "DistillSeq2SeqTask", "LMTask",
           "MaskedLMTask", "Seq2SeqTask", "distillation_task"]
