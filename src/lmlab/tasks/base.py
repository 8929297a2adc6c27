"""What every task shares: backbone + tokenizer, optimisation, checkpoint metadata, the
backbone's auxiliary losses (MoE load balancing, router z-loss) and expert-load logging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn
from torch._functorch import config as functorch_config
from torchmetrics import SumMetric

from lmlab.checkpoint import METADATA_KEY, tokenizer_files
from lmlab.errors import ConfigError
from lmlab.models.config import CUDAGRAPH_COMPILE_MODES
from lmlab.models.prepack import clear_prepacked
from lmlab.optim.momentum import zero_fused_momentum_buffers
from lmlab.tokenizers import Tokenizer


def split_weight_decay(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm weights, 1-d parameters and parameters flagged
    `_no_weight_decay` (Mamba's A_log and D) are not decayed."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            decays = p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)
            (decay if decays else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def backbone_family(backbone: nn.Module) -> str:
    """"decoder" | "encoder" | "encoder_decoder", from the backbone's ModelConfig."""
    return getattr(getattr(backbone, "config", None), "family", "decoder")


class CompiledBackbone:
    """A `torch.compile`d backbone whose backward is traced without the forward's autocast.

    torch 2.13's AOTAutograd traces a compiled backward under the autocast state of its
    forward (`backward_pass_autocast="same_as_forward"`), which eager autograd does not do:
    the backward products of `lmlab.precision`'s fp32 matmuls (run under
    `autocast(enabled=False)`) became bf16 products again, and on a CPU without native bf16
    those take the emulated scalar kernel (pytorch/pytorch#179804: a compiled bf16-mixed step
    ran 14x slower than eager). "off" is eager's behaviour and torch's next default; the
    setting is read while the joint graph is traced, i.e. inside the forward call.
    """

    def __init__(self, compiled: nn.Module, mode: str = "default") -> None:
        self.compiled = compiled
        self.mode = mode
        self._hidden = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with functorch_config.patch(backward_pass_autocast="off"):
            return self.compiled(*args, **kwargs)

    def hidden(self, *args: Any, **kwargs: Any) -> Any:
        """The backbone's `hidden` (final hidden states: what task=classify pools), compiled on
        first use: `torch.compile` of a module compiles its `forward` only."""
        if self._hidden is None:
            self._hidden = torch.compile(self.compiled._orig_mod.hidden, mode=self.mode)
        with functorch_config.patch(backward_pass_autocast="off"):
            return self._hidden(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # accepts_labels, config, ... of the backbone
        if name == "compiled":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.compiled, name)


class RatioMeter(nn.Module):
    """sum(numerators) / sum(denominators) over an evaluation, synchronised across ranks.

    Token-weighted losses and accuracies need the ratio of sums, not the mean of batch means.
    Metric states are not persistent, so meters never enter checkpoints.
    """

    def __init__(self):
        super().__init__()
        self.num = SumMetric()
        self.den = SumMetric()

    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        self.num.update(numerator)
        self.den.update(denominator)

    def compute(self) -> Tensor:
        return self.num.compute() / self.den.compute().clamp_min(1)

    def reset(self) -> None:
        self.num.reset()
        self.den.reset()


class EvalMeters(nn.Module):
    """Ratio meters per evaluation dataloader: dataloader 0 is the main one; extra ones (longer
    windows, see `TextCorpusDataModule.eval_seq_lens`) are named by their sequence length.

    `results()` gives {"": {"loss": ...}, "@512": {"loss": ...}} and resets, so a task logs
    `val/loss` and `val/loss@512` from one loop.
    """

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        self.per_loader = nn.ModuleList([self._new()])
        self.lengths: dict[int, int] = {}

    def _new(self) -> nn.ModuleDict:
        return nn.ModuleDict({name: RatioMeter() for name in self.names})

    def update(self, dataloader_idx: int, length: int, **values: tuple[Tensor, Tensor]) -> None:
        while len(self.per_loader) <= dataloader_idx:
            device = next(iter(self.per_loader[0].values())).num.device  # torchmetrics tracks it
            self.per_loader.append(self._new().to(device))
        self.lengths[dataloader_idx] = length
        for name, (numerator, denominator) in values.items():
            self.per_loader[dataloader_idx][name].update(numerator, denominator)

    def results(self) -> dict[str, dict[str, Tensor]]:
        out = {}
        for idx, meters in enumerate(self.per_loader):
            if idx and idx not in self.lengths:
                continue  # a dataloader this evaluation did not run
            suffix = f"@{self.lengths[idx]}" if idx else ""
            out[suffix] = {name: meter.compute() for name, meter in meters.items()}
            for meter in meters.values():
                meter.reset()
        self.lengths.clear()
        return out


class LMTask(L.LightningModule):
    """Base LightningModule of the objectives.

    Subclasses implement their steps and call `self.training_loss(loss, batch_size)` on the
    objective's loss: it adds the backbone's auxiliary losses (when it has any) and logs
    `train/loss` and each auxiliary term. The optimizer covers every trainable parameter of the
    task, so heads a task adds on top of the backbone train too.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
        weight_decay: float = 0.1,
        expert_load_every: int = 50,
    ):
        super().__init__()
        if weight_decay < 0:
            raise ConfigError("task.weight_decay", weight_decay, reason="must be >= 0")
        if expert_load_every < 0:
            raise ConfigError("task.expert_load_every", expert_load_every, reason="must be >= 0 (0 = off)")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = weight_decay
        self.expert_load_every = expert_load_every
        self._expert_load_step = -1  # the step whose expert-load table was last logged
        self.checkpoint_metadata = dict(checkpoint_metadata or {})
        # Counted on device over all ranks and checkpointed, so resumed runs report the job's
        # true total.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # model.compile: training steps call a compiled backbone; evaluation and generation
        # (other shapes, a KV cache) stay eager. Kept out of the module tree (`__dict__`), so
        # the state dict and checkpoints do not change.
        config = getattr(backbone, "config", None)
        mode = getattr(config, "compile_mode", "default")
        compiled = (CompiledBackbone(torch.compile(backbone, mode=mode), mode)
                    if getattr(config, "compile", False) else None)
        self.__dict__["_compiled_backbone"] = compiled
        # CUDA graphs (on a GPU; torch skips them elsewhere) replay every step into the same
        # memory: see `step_backbone` and `optimizer_zero_grad`.
        self.cuda_graph_steps = compiled is not None and mode in CUDAGRAPH_COMPILE_MODES

    def on_validation_epoch_start(self) -> None:
        # Generation's prepacked weight copies are keyed on version counters, which the fused
        # AdamW (the default optimizer) does not bump: without this, every evaluation after the
        # first generated with the weights of the first (the default run's exact-match accuracy
        # fell from 0.91 to 0.07 while its loss was right).
        clear_prepacked()

    def on_test_epoch_start(self) -> None:
        clear_prepacked()

    def on_predict_epoch_start(self) -> None:
        clear_prepacked()

    def step_backbone(self) -> nn.Module | CompiledBackbone:
        """The backbone module a step calls: the compiled one while training under
        model.compile (it forwards attribute reads to the backbone)."""
        compiled = self.__dict__.get("_compiled_backbone")
        if compiled is None or not self.training:
            return self.backbone
        if self.cuda_graph_steps:
            # One call per step, its backward done before the next: the replay may reuse the
            # last step's output memory. Lightning still holds that step's loss, so say it
            # (torch's docs ask for this mark when outputs outlive their step).
            torch.compiler.cudagraph_mark_step_begin()
        return compiled

    def run_backbone(self, *args: Any, **kwargs: Any) -> Any:
        """The backbone call of a step (see `step_backbone`)."""
        return self.step_backbone()(*args, **kwargs)

    # -- training loss with the backbone's auxiliary terms -------------------------------------
    def training_loss(self, loss: Tensor, batch_size: int) -> Tensor:
        """The objective's loss plus the backbone's (already weighted) auxiliary losses.

        `train/loss` stays the objective alone, so it is comparable between dense and MoE runs;
        `train/total_loss` is what is optimised when auxiliary terms exist.
        """
        # Not prog_bar: Lightning would turn it into a number after every batch, a host-device
        # sync per step; lmlab's ProgressBar reads it when it refreshes.
        self.log("train/loss", loss, batch_size=batch_size)
        aux = self.backbone.auxiliary_losses() if hasattr(self.backbone, "auxiliary_losses") else {}
        if aux:
            for name, value in aux.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
            loss = loss + sum(aux.values())
            self.log("train/total_loss", loss, batch_size=batch_size)
        self._log_expert_load()
        return loss

    def _log_expert_load(self) -> None:
        """`train/expert_load_max` every step: the busiest expert's share of routed tokens times
        the number of experts (1.0 = perfectly balanced), averaged over MoE layers. Every
        `expert_load_every` steps the whole [layer, expert] table goes to the loggers directly
        (`train/expert_load/layer<i>/expert<j>`): too many series to log each step.
        """
        load = self.backbone.expert_load() if hasattr(self.backbone, "expert_load") else None
        if load is None:
            return
        load = load.detach().float()
        self.log("train/expert_load_max", (load.max(dim=-1).values * load.shape[-1]).mean())
        # Steps n-1, 2n-1, ...: where the loggers read the device anyway (log_every_n_steps
        # divides the default 50), and once per step under gradient accumulation, so the table's
        # host read adds no wait of its own.
        if (not self.expert_load_every or (self.global_step + 1) % self.expert_load_every
                or not self.loggers or self._expert_load_step == self.global_step):
            return
        self._expert_load_step = self.global_step
        table = load.cpu().tolist()
        values = {
            f"train/expert_load/layer{i}/expert{j}": share
            for i, row in enumerate(table)
            for j, share in enumerate(row)
        }
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def count_tokens(self, *masks: Tensor) -> None:
        """Add the batch's real (unpadded) tokens (the sum of every mask: source and target for
        seq2seq), summed over the job's ranks, so every rank holds the job's total and the
        record and checkpoints report it (with per-batch padding the ranks' counts differ). One
        scalar all-reduce a step: queued on the stream on a GPU (no host sync), small beside
        the gradients' on a CPU."""
        count = sum(mask.sum() for mask in masks)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            # Not strategy.reduce: Lightning's puts a barrier first, a host wait on a GPU.
            torch.distributed.all_reduce(count)
        self.tokens_seen += count

    # -- checkpoint and optimisation -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer_files" not in self.checkpoint_metadata:
            self.checkpoint_metadata["tokenizer_files"] = tokenizer_files(self.tokenizer)
        checkpoint[METADATA_KEY] = self.checkpoint_metadata

    def configure_model(self) -> None:
        """Distributed strategies that reshape the module do it here (trainer=fsdp: FSDP2 shards
        each transformer block, then the rest); every other strategy leaves it as built."""
        shard = getattr(self.trainer.strategy, "shard_module", None) if self._trainer is not None else None
        if shard is not None:
            shard(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and type(plugin) is MixedPrecision and plugin.scaler is None:
            # bf16 autocast has no loss scaler, so there is nothing to unscale; Lightning's AMP
            # plugin still refuses to clip for fused optimizers (fused AdamW is the default), as
            # if a GradScaler were in play. Clip as the plain-precision plugin does.
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.cuda_graph_steps:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)
            return
        # A graphed backward writes each gradient into the graphs' memory, and autograd adopts
        # that tensor as `.grad` when there is none: the next micro-batch's replay would then
        # overwrite it before trainer.accumulate_grad_batches adds to it (torch raises
        # "accessing gradient tensor output of CUDAGraphs that has been overwritten"). Gradient
        # buffers of our own, zeroed in place, are accumulated into instead.
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        optimizer.zero_grad(set_to_none=False)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(split_weight_decay(self, self.weight_decay))
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, DeepSpeedStrategy):  # ZeRO re-groups the parameters
            zero_fused_momentum_buffers(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
