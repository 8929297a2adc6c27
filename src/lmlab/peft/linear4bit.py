"""bitsandbytes 4-bit Linears for `peft=qlora`: quantizing a Linear, loading a saved one back,
dequantizing one for a merge."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Params4bit
from torch import nn


class QuantizedLinear(bnb.nn.Linear4bit):
    """`Linear4bit` that can load its own state dict: bitsandbytes saves the packed weight and
    its quantisation statistics (`weight.absmax`, `weight.quant_map`, ...) but loading them back
    is left to transformers. Resuming, `init_from` and `lmlab export` need it here."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "weight"
        stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        stat_keys = {f"{key}.{name}" for name in stats}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in stat_keys]
        if key in state_dict and stats:
            self.weight = Params4bit.from_prequantized(
                data=state_dict[key], quantized_stats=stats, requires_grad=False,
                device=self.weight.device,
            )


def quantize_linear(linear: nn.Linear, quant_type: str, double_quant: bool,
                    compute_dtype: torch.dtype) -> QuantizedLinear:
    q = QuantizedLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
        device=linear.weight.device,
    )
    q.weight = Params4bit(linear.weight.data.float(), requires_grad=False,
                          compress_statistics=double_quant, quant_type=quant_type)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # bitsandbytes quantizes when the weight is moved to a (real) device.
    return q.to(linear.weight.device)


def dequantized_linear(layer: bnb.nn.Linear4bit) -> nn.Linear:
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.float())
    return plain
