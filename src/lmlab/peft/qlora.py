"""`peft=qlora`: the frozen base's block Linears become bitsandbytes 4-bit, LoRA trains on top.

QLoRA (Dettmers et al., 2023): every Linear inside the transformer/Mamba blocks (MoE routers
excepted) is replaced by a
`bitsandbytes` `Linear4bit` (NF4 or FP4 blocks of 64, optionally with double quantisation of
the block scales); embeddings, `lm_head`, BERT's MLM transform and task heads stay in full
precision, as in the paper's recipe. `peft`'s 4-bit LoRA layer then wraps the targeted
quantized layers. The same code runs on CPU (bitsandbytes' CPU kernels) and on GPU. lmlab
itself imports bitsandbytes only when a QLoRA run quantizes (`lmlab.peft.linear4bit`), so a
machine without it runs everything else (peft, imported when an adapter is applied, imports it
too where it is installed).

Merging is done by dequantising: each Linear4bit becomes an fp32 `nn.Linear` holding
dequant(W) (+ the LoRA update where there is one), so the merged model computes exactly what the
trained one did (up to float rounding), not a re-quantised approximation of it. It differs from
the original full-precision base by the quantisation error, which was there during training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.peft.base import state_bytes
from lmlab.peft.lora import LoRA, check_targets, linear_names

QUANT_TYPES = ("nf4", "fp4")
ALL = "all"  # target_modules value: every quantized Linear (the QLoRA paper adapts them all)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def block_linears(backbone: nn.Module) -> list[str]:
    """Names of the Linears inside the layer stacks (`layers.{i}.…`): the frozen base that is
    quantized. Embeddings, lm_head and heads outside the stacks are left alone, and so are MoE
    routers (tiny, and routing decisions are what 4-bit noise would flip; compress=quantize
    skips them too)."""
    return [name for name, m in backbone.named_modules()
            if isinstance(m, nn.Linear) and "layers" in name.split(".") and not name.endswith("router")]


def _replace(backbone: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, module)


@dataclass
class QLoRA(LoRA):
    method = "qlora"
    can_merge = True

    target_modules: list[str] = field(default_factory=lambda: [ALL])
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # quantize the per-block scales too (~0.37 bit/param saved)
    compute_dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the dequantized matmul

    def __post_init__(self) -> None:
        if self.target_modules == ALL:
            self.target_modules = [ALL]
        super().__post_init__()
        if ALL in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError("peft.target_modules", self.target_modules,
                              reason=f"{ALL!r} already names every quantized layer; give it alone")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError("peft.quant_type", self.quant_type, QUANT_TYPES)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError("peft.compute_dtype", self.compute_dtype, list(COMPUTE_DTYPES))
        if not isinstance(self.double_quant, bool):
            raise ConfigError("peft.double_quant", self.double_quant, [True, False])
        self._report: dict[str, Any] = {}

    def check(self, backbone: nn.Module) -> None:
        if getattr(getattr(backbone, "config", None), "hf_path", None):
            raise ConfigError(
                "peft", self.method, ["lora", "dora", "ia3"],
                "peft=qlora quantizes lmlab's own backbones; with model=hf use peft=lora (load "
                "the HF model in 4 bit with transformers' BitsAndBytesConfig outside lmlab)",
            )
        if self.compute_dtype == "float16" and not torch.cuda.is_available():
            # Measured: bitsandbytes' CPU float16 path gives non-finite gradients at the first step.
            raise ConfigError("peft.compute_dtype", self.compute_dtype, ["float32", "bfloat16"],
                              "float16 4-bit matmuls need a GPU; on CPU use bfloat16 or float32")
        quantized = {name.rsplit(".", 1)[-1] for name in block_linears(backbone)}
        if self.target_modules == [ALL]:
            return
        check_targets(backbone, self.target_modules)
        outside = [t for t in self.target_modules if t not in quantized]
        if outside:
            # LoRA on a full-precision head works, but is not QLoRA's frozen 4-bit base: say so
            # rather than let a typo'd target go unnoticed.
            raise ConfigError(
                "peft.target_modules", outside, sorted(quantized),
                "peft=qlora adapts the quantized block Linears; embeddings and heads stay in full "
                f"precision (adapt them with peft=lora); available: {linear_names(backbone)}",
            )

    def apply(self, backbone: nn.Module) -> nn.Module:
        # peft lazily: see lmlab.peft.lora
        from peft import inject_adapter_in_model, prepare_model_for_kbit_training

        from lmlab.peft.linear4bit import quantize_linear

        self.check(backbone)
        dtype = COMPUTE_DTYPES[self.compute_dtype]
        before = state_bytes(backbone)
        names = block_linears(backbone)
        linear_before = sum(state_bytes(backbone.get_submodule(n)) for n in names)
        for name in names:
            _replace(backbone, name, quantize_linear(backbone.get_submodule(name), self.quant_type,
                                                     self.double_quant, dtype))
        linear_after = sum(state_bytes(backbone.get_submodule(n)) for n in names)
        # peft picks its 4-bit LoRA layer (and prepare_model_for_kbit_training its k-bit path)
        # by this flag, which transformers sets on models it loaded with bitsandbytes.
        backbone.is_loaded_in_4bit = True
        # Freezes the base and upcasts fp16/bf16 non-quantized weights to fp32. lmlab has its own
        # activation checkpointing, so the transformers-only gradient checkpointing stays off.
        prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
        after = state_bytes(backbone)
        self._report = {
            "quantized_layers": len(names),
            "quant_type": self.quant_type,
            "frozen_base_bytes_before": before,
            "frozen_base_bytes_after": after,
            "quantized_linear_bytes_before": linear_before,
            "quantized_linear_bytes_after": linear_after,
        }
        targets = self.target_modules
        if targets == [ALL]:
            targets = sorted({name.rsplit(".", 1)[-1] for name in names})
        return inject_adapter_in_model(replace(self.peft_config(), target_modules=targets), backbone)

    def report(self) -> dict[str, Any]:
        return dict(self._report)

    def merge(self, backbone: nn.Module) -> nn.Module:
        """Dequantize every 4-bit layer to fp32 and add its LoRA update: a plain backbone."""
        import bitsandbytes as bnb
        from peft.tuners.tuners_utils import BaseTunerLayer

        from lmlab.peft.linear4bit import dequantized_linear

        for name, module in list(backbone.named_modules()):
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                if isinstance(base, bnb.nn.Linear4bit):
                    plain = dequantized_linear(base)
                    with torch.no_grad():
                        for adapter in module.active_adapters:
                            plain.weight += module.get_delta_weight(adapter).float()
                else:
                    module.merge()
                    plain = base
                _replace(backbone, name, plain)
        for name, module in list(backbone.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):
                _replace(backbone, name, dequantized_linear(module))
        if hasattr(backbone, "is_loaded_in_4bit"):
            del backbone.is_loaded_in_4bit
        backbone.requires_grad_(True)
        return backbone
