"""Where a training step's time goes on a GPU: ms/step, MFU and the top kernels of an lmlab
decoder step (default: GPT-2 small, T=1024, bf16 autocast, fused AdamW), for several ways of
compiling it, each measured the same way in one process.

    python -m bench.profile_step [--out profile.txt] [--batch 16] [--variants eager backbone step]

Variants: `eager` (no compile); `backbone` (the backbone compiled, the cross-entropy over fp32
logits outside); `step` (backbone and that loss in one compiled function, so the logits' upcast,
log-softmax and its gradient fuse); `fused` (what `model.compile=true` runs: the compiled
backbone called with `labels=`, its output layer + loss traced into the graph: on a GPU the
plain form of `step`, since this comparison found it faster; the chunked form elsewhere);
`fused-graphs` and `step-graphs` (the same under `mode="reduce-overhead"`: CUDA graphs);
`step-autotune` (`mode="max-autotune-no-cudagraphs"`: inductor's matmul templates tried
against cuBLAS for each shape; minutes of compilation).
`fused` against `step` says whether the chunked loss or inductor's full-logits loss is faster
on the GPU at hand; the `-graphs` variants what launch overhead costs.
FLOPs are lmlab's analytic count (`flops.TrainingFlops`), the peak the GPU table's bf16.

`--attention cudnn|flash|efficient` puts that SDPA kernel first for every variant (compiled ones
pick the kernel when they trace). `--ceiling` first times, outside any model, the step's matmul
shapes (forward and both backward products of every linear, the output layer included) and
SDPA forward+backward under each kernel: the step's FLOPs over the sum of those times is the
MFU the step could reach if everything else (norms, activations, optimizer) were free.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.callbacks.peak_flops import device_peak
from lmlab.flops import TrainingFlops
from lmlab.models import ModelConfig, build_backbone


def gpt2_small(vocab: int, seq_len: int, layers: int, d_model: int, heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads,
                       max_seq_len=seq_len, dropout=0.0, ffn="gelu", norm="layernorm",
                       position="learned", bias=True, tie_embeddings=True)


def loss_of(model):
    def loss(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss


def fused_loss_of(model):
    def loss(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(ids, labels=labels, ignore_index=-100)
    return loss


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
}


def prefer_attention(name: str) -> None:
    """Put SDPA's `name` kernel first in the selection order, for the rest of the process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    first = getattr(SDPBackend, SDPA_BACKENDS[name])
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    sdpa_kernel(order, set_priority=True).__enter__()  # left entered: process-wide


def cuda_ms(fn, repeats: int = 15, calls: int = 10) -> float:
    """ms per call of `fn`: the median over `repeats` CUDA-event timings of `calls` calls each
    (after 3 warm-ups). Several calls per timing keep the GPU's queue full, so a call's host
    cost (autograd's backward dispatch is ~0.1 ms) is not counted as device time."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


# Kernel-name prefixes or fragments of each kind of device work, first match wins. Inductor's
# kernels are named after the ops they fuse (`triton_poi_fused_addmm_gelu_...`), so they are
# told apart by prefix first: its matmul templates (`triton_tem_`) from everything else it made.
KERNEL_KINDS = (("matmul", ("triton_tem_",), True),
                ("inductor (fused elementwise/reductions)", ("triton_",), True),
                ("attention", ("sdpa", "flash", "fmha", "attention"), False),
                ("matmul", ("nvjet", "gemm", "cutlass", "xmma"), False),
                ("optimizer", ("multi_tensor_apply", "adam"), False))


def kernel_kinds(events, steps: int, step_ms: float) -> list[str]:
    """ms/step of each kind of kernel and of the time the device waited."""
    totals: dict[str, float] = {}
    for event in events:
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = event.self_cuda_time_total
        if not us:
            continue
        name = event.key.lower()
        kind = next((kind for kind, parts, prefix in KERNEL_KINDS
                     if any(name.startswith(p) if prefix else p in name for p in parts)),
                    "other")
        totals[kind] = totals.get(kind, 0.0) + us / 1e3 / steps
    busy = sum(totals.values())
    lines = ["| device work | ms/step | share of the step |", "|---|---|---|"]
    for kind, ms in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {ms:.2f} | {ms / step_ms:.1%} |")
    lines.append(f"| device idle (launch gaps, host work) | {max(step_ms - busy, 0):.2f} | "
                 f"{max(step_ms - busy, 0) / step_ms:.1%} |")
    return lines


def ceiling(config: ModelConfig, args: argparse.Namespace, peak: float | None) -> list[str]:
    """The step's matmuls and attention timed alone (see the module docstring)."""
    n = args.batch * args.seq_len
    d, f, v = args.d_model, 4 * args.d_model, args.vocab
    bf = torch.bfloat16
    # (name, in, out, per step): every linear y = x W^T of the step; its three products.
    linears = [("qkv", d, 3 * d, args.layers), ("o_proj", d, d, args.layers),
               ("fc", d, f, args.layers), ("proj", f, d, args.layers), ("lm_head", d, v, 1)]
    lines = ["\n## ceiling: matmuls and attention alone (bf16; ms per call: median of 15 CUDA-event "
             "timings of 10 calls)",
             "| product | shape (M x K x N) | ms | TFLOP/s | per step |", "|---|---|---|---|---|"]
    gemm_ms = 0.0
    for name, k_in, k_out, count in linears:
        x = torch.randn(n, k_in, device="cuda", dtype=bf)
        w = torch.randn(k_out, k_in, device="cuda", dtype=bf)
        dy = torch.randn(n, k_out, device="cuda", dtype=bf)
        for label, a, b, shape in (("fwd", x, w.t(), (n, k_in, k_out)),
                                   ("d input", dy, w, (n, k_out, k_in)),
                                   ("d weight", dy.t(), x, (k_out, n, k_in))):
            ms = cuda_ms(partial(torch.matmul, a, b))
            gemm_ms += ms * count
            flops = 2 * shape[0] * shape[1] * shape[2]
            lines.append(f"| {name} {label} | {' x '.join(map(str, shape))} | {ms:.3f} | "
                         f"{flops / ms / 1e9:.0f} | x{count} |")
    h, hd = args.heads, args.d_model // args.heads
    q, k, val = (torch.randn(args.batch, h, args.seq_len, hd, device="cuda", dtype=bf,
                             requires_grad=True) for _ in range(3))
    grad = torch.randn(args.batch, h, args.seq_len, hd, device="cuda", dtype=bf)
    attention_ms = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backend in SDPA_BACKENDS.items():
        def attend(backend=backend):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = F.scaled_dot_product_attention(q, k, val, is_causal=True)
            torch.autograd.grad(out, (q, k, val), grad)  # no accumulation into .grad
        try:
            attention_ms[name] = cuda_ms(attend)
        except RuntimeError as error:  # a kernel this GPU/torch does not have
            lines.append(f"| attention {name} | unavailable: {str(error).splitlines()[0][:80]} |")
            continue
        # causal scores counted at T x T, as lmlab's count (and MFU convention) does
        flops = 4 * 3 * args.batch * h * args.seq_len * args.seq_len * hd
        lines.append(f"| attention {name} fwd+bwd | B{args.batch} H{h} T{args.seq_len} D{hd} | "
                     f"{attention_ms[name]:.3f} | {flops / attention_ms[name] / 1e9:.0f} | "
                     f"x{args.layers} |")
    flops = TrainingFlops(config, build_backbone(config)).batch(args.batch, args.seq_len)
    for name, ms in attention_ms.items():
        total = gemm_ms + ms * args.layers
        mfu = f"{flops / (total / 1e3) / 1e12 / peak:.1%}" if peak else "—"
        lines.append(f"\nmatmuls {gemm_ms:.2f} ms + attention ({name}) {ms * args.layers:.2f} ms"
                     f" = {total:.2f} ms/step: ceiling MFU {mfu}")
    return lines


def measure(variant: str, config: ModelConfig, args: argparse.Namespace,
            peak: float | None) -> list[str]:
    """[summary line, kernel table] of one variant."""
    torch.manual_seed(0)
    model = build_backbone(config).cuda().train()
    flops = TrainingFlops(config, model).batch(args.batch, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if variant == "eager":
        loss_fn = loss_of(model)
    elif variant == "backbone":
        loss_fn = loss_of(torch.compile(model))
    elif variant == "step":
        loss_fn = torch.compile(loss_of(model))
    elif variant == "step-graphs":
        loss_fn = torch.compile(loss_of(model), mode="reduce-overhead")
    elif variant == "step-autotune":
        loss_fn = torch.compile(loss_of(model), mode="max-autotune-no-cudagraphs")
    elif variant == "fused":
        loss_fn = fused_loss_of(torch.compile(model))
    elif variant == "fused-graphs":
        loss_fn = fused_loss_of(torch.compile(model, mode="reduce-overhead"))
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device="cuda")
    labels = torch.roll(ids, -1, 1)

    def step():
        # CUDA graph trees (the -graphs variants) reuse their output memory from one replay to
        # the next: this marks where one training step ends (no effect without graphs).
        torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / args.steps
    tflops = flops / (ms / 1e3) / 1e12
    mfu = f"{tflops / peak:.1%}" if peak else "—"
    summary = (f"\n## {variant}: {ms:.2f} ms/step, {args.batch * args.seq_len / ms * 1e3:,.0f} "
               f"tok/s, {tflops:.0f} TFLOP/s, MFU {mfu}, peak memory "
               f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kinds = "\n".join(kernel_kinds(events, 3, ms))
    return [summary + "\n\n" + kinds,
            events.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="also write the summary lines and kernel tables to this file (they are "
                   "printed either way)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", nargs="*", default=["step", "fused", "step-graphs"],
                   choices=["eager", "backbone", "step", "step-graphs", "step-autotune", "fused",
                            "fused-graphs"])
    p.add_argument("--attention", choices=sorted(SDPA_BACKENDS), default=None,
                   help="the SDPA kernel to put first (default: torch's own order)")
    p.add_argument("--ceiling", action="store_true",
                   help="first time the step's matmuls and attention alone")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    config = gpt2_small(args.vocab, args.seq_len, args.layers, args.d_model, args.heads)
    _, peak = device_peak(torch.cuda.get_device_name(), "bf16")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch}x"
             f"{args.seq_len}, {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}"
             f", attention {args.attention or 'torch default order'}"]
    if args.ceiling:
        ceiling_lines = ceiling(config, args, peak)
        lines += ceiling_lines
        print("\n".join(ceiling_lines), flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the variants' peaks are their own
    if args.attention:
        prefer_attention(args.attention)
    for variant in args.variants:
        lines += measure(variant, config, args, peak)
        print(lines[-2], flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
    text = "\n".join(lines) + "\n"
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
