"""Post-training weight quantization of the backbone's Linear layers (see `targets`).

- `int8`: bitsandbytes `Linear8bitLt` (LLM.int8 weights: one absmax scale per output row);
  `threshold: 0` keeps every input column in int8, a positive threshold keeps outlier columns
  in 16-bit (mixed-precision decomposition, Dettmers et al. 2022).
- `nf4`: bitsandbytes `Linear4bit` with 4-bit NormalFloat blocks of `blocksize` weights and
  optional double quantization of the block scales; the matmul runs in `compute_dtype` after
  dequantization.
- `dynamic_int8`: `torch.ao.quantization.quantize_dynamic` — int8 weights, activations
  quantized on the fly per batch; torch's CPU inference path.

All three run on the CPU here (bitsandbytes ≥ 0.45 has CPU kernels), and every variant is
evaluated on the CPU so before/after numbers are comparable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lmlab.compress.base import Compression, check_choice, check_int
from lmlab.compress.targets import compressible_linears
from lmlab.errors import ConfigError

DTYPES = ("int8", "nf4", "dynamic_int8")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _int8(linear: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    q.weight = bnb.nn.Int8Params(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().cpu().clone(), requires_grad=False)
    return q.to("cpu")  # the move quantizes the weight


def _nf4(linear: nn.Linear, compute_dtype: torch.dtype, blocksize: int, double_quant: bool) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                 blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().cpu().clone(), requires_grad=False)
    return q.to("cpu")


def quantize_linears(backbone: nn.Module, layers: dict[str, nn.Linear], dtype: str, *,
                     threshold: float = 0.0, compute_dtype: str = "float32", blocksize: int = 64,
                     double_quant: bool = True) -> nn.Module:
    """Replace `layers` (names in `backbone`) by quantized ones; returns the backbone on the CPU."""
    backbone = backbone.float().cpu().eval()
    if dtype == "dynamic_int8":
        with warnings.catch_warnings():
            # torch marks its eager quantization API deprecated in favour of torchao; it is
            # still the one shipped with torch and what the CPU inference path uses.
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(backbone, qconfig_spec=set(layers), dtype=torch.qint8, inplace=True)
    for name, linear in layers.items():
        if dtype == "int8":
            _set_module(backbone, name, _int8(linear, threshold))
        elif dtype == "nf4":
            _set_module(backbone, name, _nf4(linear, COMPUTE_DTYPES[compute_dtype], blocksize, double_quant))
        else:
            raise ValueError(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


@dataclass
class Quantization(Compression):
    """`compress=quantize`; see conf/compress/quantize.yaml for the fields."""

    method: ClassVar[str] = "quantize"
    cpu_only: ClassVar[bool] = True
    measures_latency: ClassVar[bool] = True

    dtype: str = "int8"
    threshold: float = 0.0
    compute_dtype: str = "float32"
    blocksize: int = 64
    double_quant: bool = True
    include_lm_head: bool = False
    latency_tokens: int = 8
    latency_repeats: int = 5

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compute_dtype", self.compute_dtype, tuple(COMPUTE_DTYPES))
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or self.threshold < 0:
            raise ConfigError("compress.threshold", self.threshold, reason="must be a number >= 0 (0 = all int8)")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError("compress.blocksize", self.blocksize, [64, 128, 256, 512, 1024, 2048, 4096],
                              "bitsandbytes' 4-bit block sizes")
        for name in ("double_quant", "include_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compress.{name}", getattr(self, name), [True, False])
        check_int("latency_tokens", self.latency_tokens, 1)
        check_int("latency_repeats", self.latency_repeats, 1)

    def check(self, backbone: nn.Module, max_steps: int | None) -> None:
        layers = compressible_linears(backbone, self.include_lm_head)
        if not layers:
            raise ConfigError("compress.dtype", self.dtype,
                              reason="the backbone has no Linear layers (torch.nn.Linear) to quantize")
        if self.dtype == "nf4":
            odd = [n for n, m in layers.items() if (m.in_features * m.out_features) % 2]
            if odd:
                raise ConfigError("compress.dtype", self.dtype,
                                  reason=f"nf4 packs two weights per byte; {odd[0]} has an odd number of weights")

    def apply(self, backbone: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        layers = compressible_linears(backbone, self.include_lm_head)
        backbone = quantize_linears(backbone, layers, self.dtype, threshold=self.threshold,
                                    compute_dtype=self.compute_dtype, blocksize=self.blocksize,
                                    double_quant=self.double_quant)
        return backbone, {"quantized_layers": len(layers)}
