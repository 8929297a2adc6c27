"""Post-training quantization with bitsandbytes (int8, nf4) and torch (dynamic int8), on CPU:
the quantized weights against hand-written references, outputs close to fp32, smaller models,
latency measured with KV-cache generation, and a whole run."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit

from lmlab import ConfigError
from lmlab.compress import Quantization, build_compression
from lmlab.compress.measure import latency_per_token_ms, parameter_count, size_in_bytes
from lmlab.compress.quantize import _int8, _nf4, quantize_linears
from lmlab.compress.targets import compressible_linears
from tests.compress.conftest import tiny


def _linear(seed: int = 0, n_in: int = 64, n_out: int = 48) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


def test_int8_weights_are_rowwise_absmax_codes():
    linear = _linear()
    q = _int8(linear, threshold=0.0)
    assert isinstance(q, bnb.nn.Linear8bitLt) and q.weight.dtype == torch.int8
    w = linear.weight.detach().half().float()  # bitsandbytes quantizes from fp16
    absmax = w.abs().amax(dim=1)
    torch.testing.assert_close(q.weight.SCB.float(), absmax, rtol=1e-3, atol=1e-6)
    codes = torch.round(w / absmax[:, None] * 127).to(torch.int8)
    assert (q.weight.data.int() - codes.int()).abs().max() <= 1  # rounding-mode ties only
    x = torch.randn(5, 64)
    dequantized = q.weight.data.float() * absmax[:, None] / 127
    reference = x @ dequantized.T + linear.bias.detach()
    # the activations are quantized to int8 too (LLM.int8), so only close to the reference
    torch.testing.assert_close(q(x), reference, rtol=0.05, atol=0.02)


def test_nf4_forward_is_dequantize_then_matmul():
    linear = _linear(1)
    q = _nf4(linear, torch.float32, blocksize=64, double_quant=True)
    assert isinstance(q, bnb.nn.Linear4bit)
    dequantized = dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), x @ dequantized.T + linear.bias.detach(), rtol=1e-4, atol=1e-4)
    # every dequantized weight is one of the 16 NF4 levels times its block's absmax
    w = linear.weight.detach().flatten()
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = q.weight.quant_state.code.float()
    normalised = dequantized.flatten().view(-1, 64) / absmax
    nearest = (normalised[..., None] - levels).abs().min(dim=-1).values
    assert nearest.max() < 2e-2  # the scales themselves are 8-bit (double quantization)
    assert (dequantized.flatten() - w).abs().max() <= 0.2 * absmax.max()


@pytest.mark.parametrize("dtype", ["int8", "nf4", "dynamic_int8"])
def test_quantized_decoder_is_smaller_and_close(dtype):
    backbone = tiny(d_model=64)
    x = torch.randint(6, 50, (2, 12))
    with torch.no_grad():
        reference = backbone(x)
    size, params = size_in_bytes(backbone), parameter_count(backbone)
    layers = compressible_linears(backbone)
    quantized = quantize_linears(backbone, layers, dtype)
    with torch.no_grad():
        out = quantized(x)
    assert size_in_bytes(quantized) < 0.75 * size
    assert parameter_count(quantized) == params
    assert not any(type(m) is torch.nn.Linear for n, m in quantized.named_modules() if n in layers)
    error = (out.softmax(-1) - reference.softmax(-1)).abs().max()
    assert error < (0.05 if dtype == "nf4" else 0.01)


def test_latency_is_measured_for_generating_families_only():
    assert latency_per_token_ms(tiny(), 50, n_tokens=2, repeats=1) > 0
    assert latency_per_token_ms(tiny(family="encoder_decoder"), 50, n_tokens=2, repeats=1) > 0
    assert latency_per_token_ms(tiny(family="encoder", norm_position="post"), 50) is None


def test_config_mistakes_are_config_errors():
    for cfg, field in [({"method": "quantize", "dtype": "fp8"}, "compress.dtype"),
                       ({"method": "quantize", "blocksize": 100}, "compress.blocksize"),
                       ({"method": "quantize", "compute_dtype": "int4"}, "compress.compute_dtype"),
                       ({"method": "quantize", "finetune_steps": 3}, "compress.finetune_steps")]:
        with pytest.raises(ConfigError) as info:
            build_compression(cfg)
        assert info.value.field == field
    no_linear = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(ConfigError, match="no Linear layers"):
        Quantization(dtype="nf4").check(no_linear, None)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "nf4", "dynamic_int8"])
def test_quantize_run_records_size_latency_and_metrics(make_cfg, dtype):
    from lmlab.train import run

    record = run(make_cfg(["compress=quantize", f"compress.dtype={dtype}", "compress.latency_repeats=2"]))
    section = record["compress"]
    assert section["size_bytes_after"] < section["size_bytes_before"]
    assert section["latency_ms_per_token_before"] > 0 and section["latency_ms_per_token_after"] > 0
    assert abs(section["metrics_after"]["val/loss"] - section["metrics_before"]["val/loss"]) < 0.1
