"""LightningModules = objectives. A task knows its backbone family, never Hydra."""

from lmlab.tasks.clm import CausalLMTask

#: task name → (LightningModule class, backbone families it can serve, data kinds it reads)
TASKS = {
    "clm": (CausalLMTask, ("decoder",), ("pairs", "text")),
}

__all__ = ["CausalLMTask", "TASKS"]
