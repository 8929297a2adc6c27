"""Where a training step's time goes on a GPU: ms/step, MFU and the top kernels of an lmlab
decoder step (default: GPT-2 small, T=1024, bf16 autocast, fused AdamW), for several ways of
compiling it, each measured the same way in one process.

    python -m bench.profile_step [--out profile.txt] [--batch 16] [--variants eager backbone step]

Variants: `eager` (no compile); `backbone` (the backbone compiled, the cross-entropy over fp32
logits outside); `step` (backbone and that loss in one compiled function, so the logits' upcast,
log-softmax and its gradient fuse); `fused` (what `model.compile=true` runs: the compiled
backbone called with `labels=`, its chunked fused output layer + loss traced into the graph);
`fused-graphs` and `step-graphs` (the same under `mode="reduce-overhead"`: CUDA graphs).
`fused` against `step` says whether the chunked loss or inductor's full-logits loss is faster
on the GPU at hand; the `-graphs` variants what launch overhead costs.
FLOPs are lmlab's analytic count (`flops.TrainingFlops`), the peak the GPU table's bf16.
"""

from __future__ import annotations

import argparse
import sys
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
    return [summary, prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                               max_name_column_width=70)]


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
    p.add_argument("--variants", nargs="+", default=["step", "fused", "fused-graphs"],
                   choices=["eager", "backbone", "step", "step-graphs", "fused", "fused-graphs"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    config = gpt2_small(args.vocab, args.seq_len, args.layers, args.d_model, args.heads)
    _, peak = device_peak(torch.cuda.get_device_name(), "bf16")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch}x"
             f"{args.seq_len}, {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}"]
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
