"""Building a run's parts from a composed config, validating everything before compute.

Order matters: every check that needs no data runs first (model shape, task ↔ family,
PEFT targets on a weightless copy of the backbone, trainer/logger fields), then the data module
trains or loads the tokenizer, then the real backbone is built with the tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lmlab.checkpoint import InitSource, ResumeSource, load_init_source
from lmlab.data import LMDataModule
from lmlab.errors import ConfigError
from lmlab.instantiate import accepted_keys, check_node, instantiate_checked
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.config import RUNTIME_FIELDS
from lmlab.optim.probe import check_optimizer
from lmlab.peft import PeftStrategy, build_peft_strategy
from lmlab.peft.adapter_io import read_adapter, trainable_keys
from lmlab.tasks import TASKS
from lmlab.tasks.distill import build_teacher, teacher_for
from lmlab.tokenizers import TokenizerConfig


@dataclass
class RunParts:
    model_config: ModelConfig
    strategy: PeftStrategy
    datamodule: LMDataModule
    task: L.LightningModule
    init_source: InitSource | None


def to_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_config_from(cfg: DictConfig, init: InitSource | None) -> ModelConfig:
    if init is not None:
        # The architecture is the checkpoint's; only settings that leave shapes alone follow cfg.
        model_cfg = ModelConfig.from_dict(init.model_config)
        user = to_container(cfg.model)
        for key in RUNTIME_FIELDS:
            if key in user:
                setattr(model_cfg, key, user[key])
    else:
        model_cfg = ModelConfig.from_dict(to_container(cfg.model))
    return model_cfg


def check_hf_pairing(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """A wrapped HF model only understands the ids of its own tokenizer."""
    if not model_cfg.hf_path:
        return
    tok = to_container(cfg.tokenizer)
    if tok.get("kind") != "hf" or not tok.get("path"):
        raise ConfigError(
            "tokenizer", tok.get("kind"), ["hf"],
            f"model.hf_path={model_cfg.hf_path} needs its own tokenizer: tokenizer=hf tokenizer.path={model_cfg.hf_path}",
        )


def check_model(model_cfg: ModelConfig) -> nn.Module:
    """Validate the architecture and build it without weights (on the meta device) to catch
    impossible shapes; the result lets PEFT check its targets before any data is touched."""
    probe = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": max(model_cfg.vocab_size, 64)})
    probe.validate()
    with torch.device("meta"):
        return build_backbone(probe)


# Constructor arguments the run supplies itself, not the task config.
GIVEN_TO_TASKS = {"backbone", "tokenizer", "optimizer", "scheduler", "checkpoint_metadata"}


def check_schedule(scheduler: Any, max_steps: int | None) -> None:
    """Schedules check their fields only when called: call one on a throwaway optimizer now,
    rather than at the start of fit."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler(dummy, total_steps=max(1, max_steps or 1))


def check_task(cfg: DictConfig, model_cfg: ModelConfig) -> tuple[type, dict[str, Any]]:
    task_cfg = dict(to_container(cfg.task))
    name = task_cfg.pop("name", None)
    if name not in TASKS:
        raise ConfigError("task.name", name, sorted(TASKS), "unknown task")
    cls, families, data_kinds = TASKS[name]
    valid = accepted_keys(cls)
    for key, value in task_cfg.items():
        if valid is not None and key not in valid:
            raise ConfigError(f"task.{key}", value, sorted(valid - GIVEN_TO_TASKS), f"task={name} has no such field")
    if model_cfg.family not in families:
        raise ConfigError(
            "task", name, [t for t, (_, fams, _) in TASKS.items() if model_cfg.family in fams],
            f"task={name} needs a backbone of family {', '.join(families)}; model.family is "
            f"{model_cfg.family!r}",
        )
    return cls, task_cfg


# Data that can be served in several formats is served in the one its task reads.
TASK_DATA_FORMAT = {"seq2seq": "seq2seq", "clm": "clm"}
# ... or, for tasks serving several families, the one the backbone's family reads.
FAMILY_DATA_FORMAT = {"decoder": "clm", "encoder_decoder": "seq2seq"}


def build_datamodule(cfg: DictConfig, init: InitSource | None, ckpt_tokenizer=None,
                     family: str | None = None) -> LMDataModule:
    tokenizer = ckpt_tokenizer or (init.tokenizer if init is not None else None)
    extra: dict[str, Any] = {}
    if cfg.data.get("format", None) == "auto" and cfg.task.name in TASK_DATA_FORMAT:
        extra["format"] = TASK_DATA_FORMAT[cfg.task.name]
    elif cfg.data.get("format", None) == "auto" and cfg.task.name == "distill" and family in FAMILY_DATA_FORMAT:
        extra["format"] = FAMILY_DATA_FORMAT[family]
    dm = instantiate_checked(
        cfg.data,
        "data",
        tokenizer=to_container(cfg.tokenizer),
        seed=cfg.seed,
        cache_dir=cfg.paths.cache_dir,
        pretrained_tokenizer=tokenizer,
        **extra,
    )
    if dm.kind not in TASKS[cfg.task.name][2]:
        raise ConfigError("data", type(dm).__name__, TASKS[cfg.task.name][2],
                          f"task={cfg.task.name} cannot read {dm.kind} data")
    dm.setup("fit")  # reads the data and trains (or loads) the tokenizer
    return dm


def check_lengths(dm: LMDataModule, model_cfg: ModelConfig) -> None:
    needed = dm.max_sequence_length
    if model_cfg.position == "learned" and needed > model_cfg.max_seq_len:
        field, value = "model.max_seq_len", model_cfg.max_seq_len
        if getattr(dm, "seq_len", 0) > model_cfg.max_seq_len:
            field, value = "data.seq_len", dm.seq_len
        elif any(n > model_cfg.max_seq_len for n in getattr(dm, "eval_seq_lens", ()) or ()):
            field, value = "data.eval_seq_lens", list(dm.eval_seq_lens)
        elif getattr(dm, "max_length", 0) > model_cfg.max_seq_len:
            field, value = "data.max_length", dm.max_length
        raise ConfigError(
            field, value,
            reason=f"sequences of {needed} tokens exceed model.max_seq_len={model_cfg.max_seq_len}, "
            "which learned positions cannot go beyond; raise model.max_seq_len or lower data.seq_len",
        )


def build_parts(cfg: DictConfig, resume: ResumeSource | None = None) -> RunParts:
    init = load_init_source(cfg.init_from) if cfg.get("init_from") else None
    adapter = read_adapter(cfg.peft_from) if cfg.get("peft_from") else None
    model_cfg = model_config_from(cfg, init)
    probe = check_model(model_cfg)
    check_hf_pairing(cfg, model_cfg)
    task_cls, task_kwargs = check_task(cfg, model_cfg)
    # task=distill: the teacher checkpoint is read now (errors before compute); its tokenizer is the run's.
    teacher = teacher_for(cfg.task.name, task_kwargs, cfg.get("teacher"), model_cfg)
    peft_cfg = to_container(cfg.peft)
    if adapter is not None:  # the adapter fixes the PEFT method and the architecture it fits
        peft_cfg = adapter.peft_config(peft_cfg)
        adapter.check_model(model_cfg.to_dict())
    strategy = build_peft_strategy(peft_cfg)
    strategy.check(probe)
    if resume is not None:
        # With init_from or a teacher the run's tokenizer is theirs, not cfg.tokenizer.
        given = (init or teacher).tokenizer if (init or teacher) is not None else None
        resume.check_matches(model_cfg.to_dict(), strategy.to_dict(),
                             given.config.to_dict() if given is not None
                             else TokenizerConfig.from_dict(to_container(cfg.tokenizer)).to_dict())
    for group in ("optimizer", "scheduler"):
        if cfg.get(group) is not None:
            check_node(cfg[group], group, provided={"params", "optimizer", "total_steps"})
    check_node(cfg.trainer, "trainer", provided={"callbacks", "logger"})
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if node is not None and "_target_" in node:
                check_node(node, f"{group}.{name}")

    optimizer = instantiate_checked(cfg.optimizer, "optimizer")
    check_optimizer(optimizer)
    scheduler = instantiate_checked(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    if scheduler is not None:
        check_schedule(scheduler, cfg.trainer.get("max_steps"))

    dm = build_datamodule(cfg, init or teacher, resume.tokenizer if resume is not None else None,
                          model_cfg.family)
    check_lengths(dm, model_cfg)
    if hasattr(strategy, "check_lengths"):  # methods that add positions (peft=prompt)
        strategy.check_lengths(dm.max_sequence_length, model_cfg)

    model_cfg.vocab_size = dm.tokenizer.vocab_size
    if model_cfg.hf_path and model_cfg.hf_id_offset is None:
        model_cfg.hf_id_offset = getattr(dm.tokenizer, "id_offset", None)
    backbone = build_backbone(model_cfg)
    if init is not None:
        init.load_into(backbone)
    if hasattr(strategy, "use_tokenizer"):  # peft=prompt's init=text reads the run's tokenizer
        strategy.use_tokenizer(dm.tokenizer)
    backbone = strategy.apply(backbone)
    if teacher is not None:
        task_kwargs["teacher"] = build_teacher(teacher, dm.tokenizer)

    # What only the data knows (classes, longest target) fills the task's unset fields.
    accepted = accepted_keys(task_cls)
    for key, value in dm.task_kwargs().items():
        if task_kwargs.get(key) is None and (accepted is None or key in accepted):
            task_kwargs[key] = value
    task = task_cls(
        backbone=backbone,
        tokenizer=dm.tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpoint_metadata={
            "model": model_cfg.to_dict(),
            "peft": strategy.to_dict(),
        },
        **{k: v for k, v in task_kwargs.items() if v is not None},
    )
    task.checkpoint_metadata["trainable"] = trainable_keys(task)  # for `export --adapter-only`
    if adapter is not None:
        adapter.load_into(task)
    if not any(p.requires_grad for p in task.parameters()):
        why = (f"freezes the backbone and task={cfg.task.name} has no head of its own (use it with "
               "task=classify)" if strategy.method == "frozen" else
               "found no parameter of this model to train (e.g. bitfit in a model without biases "
               "or norm layers)")
        raise ConfigError("peft", strategy.method,
                          reason=f"nothing would train: peft={strategy.method} {why}")
    return RunParts(model_cfg, strategy, dm, task, init)
