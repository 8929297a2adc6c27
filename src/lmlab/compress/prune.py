"""`compress=prune`: magnitude pruning, unstructured or structured, one-shot or gradual."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lightning.pytorch.callbacks import Callback
from torch import nn

from lmlab.compress.base import Compression, check_choice, check_fraction, check_int
from lmlab.compress.gradual import GradualPruning
from lmlab.compress.measure import nonzero_count
from lmlab.compress.structured import (
    count_heads_and_neurons,
    feed_forwards,
    plan_structured,
    self_attentions,
    shrink,
)
from lmlab.compress.targets import compressible_linears
from lmlab.compress.unstructured import SCOPES, make_permanent, prune_to, sparsity_of
from lmlab.errors import ConfigError

KINDS = ("unstructured", "structured")
SCHEDULES = ("oneshot", "gradual")
IMPORTANCE = ("l2",)


@dataclass
class Pruning(Compression):
    """See conf/compress/prune.yaml for the fields."""

    method: ClassVar[str] = "prune"

    kind: str = "unstructured"
    sparsity: float = 0.5
    scope: str = "global"
    schedule: str = "oneshot"
    start_step: int = 0
    end_step: int | None = None
    every_n_steps: int = 10
    initial_sparsity: float = 0.0
    heads: int = 1
    ffn_sparsity: float = 0.5
    importance: str = "l2"
    include_lm_head: bool = False
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("scope", self.scope, SCOPES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("importance", self.importance, IMPORTANCE)
        check_fraction("sparsity", self.sparsity)
        check_fraction("initial_sparsity", self.initial_sparsity)
        check_fraction("ffn_sparsity", self.ffn_sparsity)
        check_int("start_step", self.start_step, 0)
        check_int("end_step", self.end_step, 1, allow_none=True)
        check_int("every_n_steps", self.every_n_steps, 1)
        check_int("heads", self.heads, 0)
        check_int("finetune_steps", self.finetune_steps, 0)
        if not isinstance(self.include_lm_head, bool):
            raise ConfigError("compress.include_lm_head", self.include_lm_head, [True, False])
        if self.schedule == "gradual":
            if self.kind == "structured":
                raise ConfigError("compress.schedule", self.schedule, ["oneshot"],
                                  "structured pruning shrinks the layers once, after training")
            if self.initial_sparsity > self.sparsity:
                raise ConfigError("compress.initial_sparsity", self.initial_sparsity,
                                  reason=f"must not exceed compress.sparsity={self.sparsity}")
            if self.end_step is not None and self.end_step <= self.start_step:
                raise ConfigError("compress.end_step", self.end_step,
                                  reason=f"must be after compress.start_step={self.start_step}")
        if self.kind == "structured" and not self.heads and not self.ffn_sparsity:
            raise ConfigError("compress.heads", self.heads,
                              reason="structured pruning with heads=0 and ffn_sparsity=0 removes nothing")

    def check(self, backbone: nn.Module, max_steps: int | None) -> None:
        if self.kind == "unstructured":
            if not compressible_linears(backbone, self.include_lm_head):
                raise ConfigError("compress", self.method,
                                  reason="the backbone has no Linear layers to prune")
            if self.schedule == "gradual" and max_steps is not None and max_steps >= 0:
                end = self.end_step if self.end_step is not None else max_steps
                if end > max_steps or self.start_step >= max(end, 1):
                    raise ConfigError(
                        "compress.end_step" if self.end_step is not None else "compress.start_step",
                        self.end_step if self.end_step is not None else self.start_step,
                        reason=f"the gradual schedule start_step={self.start_step}..end_step={end} must "
                        f"lie within trainer.max_steps={max_steps}")
            return
        self._check_structured(backbone)

    def _check_structured(self, backbone: nn.Module) -> None:
        attentions, ffns = self_attentions(backbone), feed_forwards(backbone)
        if self.heads:
            if not attentions:
                raise ConfigError("compress.heads", self.heads, [0],
                                  "the backbone has no lmlab self-attention layers to prune heads from")
            for attn in attentions.values():
                h, kv = attn.n_heads, attn.n_kv_heads
                if kv == h and self.heads >= h:
                    raise ConfigError("compress.heads", self.heads, list(range(h)),
                                      f"the layers have {h} heads and at least one must stay")
                if kv != h and (self.heads % kv or self.heads // kv >= h // kv):
                    valid = [kv * i for i in range(h // kv)]
                    raise ConfigError("compress.heads", self.heads, valid,
                                      f"with {kv} key/value heads, the same number of query heads goes from "
                                      f"every group of {h // kv}: a multiple of {kv} that leaves one per group")
        if self.ffn_sparsity:
            if not ffns:
                raise ConfigError("compress.ffn_sparsity", self.ffn_sparsity, [0],
                                  "the backbone has no lmlab FFN layers (relu/gelu/swiglu or experts)")
            smallest = min(f.up_proj.out_features for f in ffns.values())
            if smallest - round(self.ffn_sparsity * smallest) < 1:
                raise ConfigError("compress.ffn_sparsity", self.ffn_sparsity,
                                  reason=f"would remove every neuron of an FFN with {smallest}")

    def callbacks(self) -> list[Callback]:
        if self.schedule != "gradual":
            return []
        return [GradualPruning(self.sparsity, self.scope, self.start_step, self.end_step, self.every_n_steps,
                               self.initial_sparsity, self.include_lm_head)]

    def apply(self, backbone: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        if self.kind == "structured":
            before = count_heads_and_neurons(backbone)
            backbone = shrink(backbone, plan_structured(backbone, self.heads, self.ffn_sparsity))
            after = count_heads_and_neurons(backbone)
            return backbone, {f"{k}_before": v for k, v in before.items()} | {
                f"{k}_after": v for k, v in after.items()}
        layers = compressible_linears(backbone, self.include_lm_head)
        # Gradual runs arrive already pruned: this is then a no-op (or tops up a short run).
        prune_to(layers, self.sparsity, self.scope)
        return backbone, {"pruned_layers": len(layers), "target_sparsity": self.sparsity}

    def finish(self, backbone: nn.Module) -> nn.Module:
        return make_permanent(backbone)

    def sparsity_report(self, backbone: nn.Module) -> dict[str, Any]:
        layers = compressible_linears(backbone, self.include_lm_head)
        return {"sparsity": sparsity_of(layers), "nonzero_weights": nonzero_count(layers),
                "prunable_weights": sum(m.weight.numel() for m in layers.values())}
