"""Peak dense matmul throughput of common accelerators, the denominator of MFU.

Numbers are NVIDIA's datasheet dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s for one
GPU. `fp32` is the plain FP32 (CUDA-core) rate; a 32-bit run that lets matmuls use TF32
(`torch.set_float32_matmul_precision("high")`) is measured against `tf32`. CPUs and GPUs not
listed have no entry: give `callbacks.throughput.peak_tflops` to get an MFU for them.
"""

from __future__ import annotations

import re

import torch

# (pattern on torch.cuda.get_device_name(), name, {precision: TFLOP/s}). First match wins, so
# the more specific variants (PCIe, NVL) come before the SXM default of each chip.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100", "V100", {"fp16": 125.0, "fp32": 15.7}),
]


def precision_kind(precision: str | int | None) -> str:
    """Lightning's `trainer.precision` -> the peak column that bounds its matmuls."""
    text = str(precision or "32")
    if text.startswith("bf16"):
        return "bf16"
    if text.startswith("16"):
        return "fp16"
    if text.startswith("64"):
        return "fp64"
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def compute_kind(trainer) -> str:
    """The peak column of a run: `precision_kind(trainer.precision)`, unless the strategy
    casts the weights for compute (FSDP2's `param_dtype`: its matmuls run in that dtype
    whatever `trainer.precision` says, and an fp32 peak would overstate the MFU ~2-15x)."""
    compute_dtype = getattr(getattr(trainer, "strategy", None), "param_dtype", None)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype,
                                                               precision_kind(trainer.precision))


def device_peak(device_name: str, precision: str) -> tuple[str | None, float | None]:
    """(the table's name for the device, its peak TFLOP/s at `precision`), None when unknown."""
    for pattern, name, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            if precision == "tf32" and "tf32" not in peaks:
                # A GPU without TF32 (V100) runs fp32 matmuls whatever torch was asked for.
                return f"{name} (no TF32: its fp32 peak)", peaks.get("fp32")
            return name, peaks.get(precision)
    return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
