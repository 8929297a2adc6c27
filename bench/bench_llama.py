"""lmlab `model=gqa` vs transformers' LlamaForCausalLM with the same dimensions and weights.

The lmlab backbone is built, exported with `lmlab.models.hf.export_hf` and loaded by
`LlamaForCausalLM.from_pretrained`, and the logits are checked equal before anything is timed.

- train: tokens/s of a full training step (forward, fp32 cross-entropy, backward, fused AdamW
  on both sides: the default of lmlab and of the HF Trainer) in fp32 and bf16 autocast, both
  eager (HF with SDPA; lmlab with SDPA, or on a CPU in fp32, and in bf16 where the CPU has no
  bf16 GEMMs, its blocked causal training attention, `layers/causal_attention.py`) and both under `torch.compile` (the step's model call; lmlab's
  `model.compile=true` does the same). lmlab computes its loss with the clm task's
  `causal_lm_loss` (the backbone's fused output layer + cross-entropy), HF the way its users
  call it (`labels=`); the two losses are checked equal first. On a CPU without bf16 GEMM
  kernels the bf16 rows are measured twice: against HF as its users run it (the emulated bf16
  kernel: what lmlab's `lmlab.precision` saves them), and with HF's products under the same
  `lmlab.precision` context as lmlab's ("equal kernels": the model code compared, nothing
  else; lmlab's attention code is its blocked one there, HF's SDPA on the fp32 kernel), eager and compiled, the rows against HF as run with 1 step a repeat (its emulated bf16
  step takes ~40-50 s here).
- generate: greedy decoding with a KV cache, `lmlab.models.generation.generate` vs
  `LlamaForCausalLM.generate` (no early stop), tokens/s of new tokens; the tokens are compared.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import torch

from bench.common import (
    Row,
    Size,
    adamw,
    autocast,
    cpu_speedup,
    interleaved,
    paired_speedup,
    rate_row,
    shifted_labels,
    synchronize,
    training_repeats,
)
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.generation import generate
from lmlab.models.hf import export_hf
from lmlab.precision import emulated_bf16, matmul_context
from lmlab.tasks.base import CompiledBackbone
from lmlab.tasks.clm import causal_lm_loss

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
EAGER_GOAL, COMPILED_GOAL, GENERATE_GOAL = 1.05, 1.10, 1.2
EQUAL_KERNELS = ("equal kernels: HF's products under lmlab.precision's fp32-kernel bf16 too, "
                 "as lmlab's")


def gqa_config(size: Size) -> ModelConfig:
    """`conf/model/gqa.yaml` at the bench dimensions (untied, as Llama)."""
    return ModelConfig(vocab_size=size.vocab, d_model=size.d_model, n_layers=size.n_layers,
                       n_heads=size.n_heads, n_kv_heads=size.n_kv_heads, d_ff=size.d_ff,
                       ffn="swiglu", norm="rmsnorm", position="rope", bias=False,
                       tie_embeddings=False, max_seq_len=max(size.seq_len,
                                                             size.gen_prompt + size.gen_new))


def llama_pair(size: Size, device: torch.device | str = "cpu"
               ) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(lmlab backbone, LlamaForCausalLM with the same weights, max |logit difference|), both
    on `device`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = gqa_config(size)
    lmlab = build_backbone(config)
    with tempfile.TemporaryDirectory() as directory:
        export_hf(lmlab, config, directory)
        hf = LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa",
                                              dtype=torch.float32)
    lmlab, hf = lmlab.to(device), hf.to(device)
    ids = torch.randint(0, size.vocab, (2, min(size.seq_len, 64)), device=device)
    with torch.no_grad():
        diff = (lmlab(ids) - hf(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"lmlab and HF Llama logits differ by {diff}: not the same model")
    return lmlab.train(), hf.train(), diff


def _loss(model, ids, labels, dtype: str, hf: bool, hf_equal_kernels: bool = False
          ) -> torch.Tensor:
    """One side's training loss: HF through `labels=`, lmlab through the clm task's function
    (`model` is the backbone or its compiled module, as in a `model.compile=true` run) in the
    matmul context of an lmlab run at that precision (`lmlab.precision`: on a CPU without bf16
    GEMM, bf16 products on the fp32 kernel with bf16 rounding); HF in that context too with
    `hf_equal_kernels`."""
    context = (matmul_context("bf16-mixed" if dtype == "bf16" else "32-true", ids.device)
               if hf_equal_kernels or not hf else contextlib.nullcontext())
    with autocast(ids.device, dtype), context:
        if hf:
            return model(input_ids=ids, labels=ids).loss
        return causal_lm_loss(model, ids, labels)


def _train_step(model, ids, labels, optimizer, dtype, hf: bool,
                hf_equal_kernels: bool = False) -> None:
    _loss(model, ids, labels, dtype, hf, hf_equal_kernels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_rows(size: Size, compiled: bool = True, device: torch.device | str = "cpu") -> list[Row]:
    """Eager rows, then (with `compiled`) the compiled ones; `--quick` leaves compilation
    out (minutes of inductor codegen on a 2-core machine)."""
    lmlab, hf, diff = llama_pair(size, device)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq_len), device=device)
    labels = shifted_labels(ids)
    # With autograd on, at the timed shape: the code path the timed steps run (lmlab's CPU
    # training attention is not SDPA's inference one).
    loss_diff = (_loss(lmlab, ids, labels, "fp32", False)
                 - _loss(hf, ids, labels, "fp32", True)).abs().item()
    if loss_diff > 1e-4:
        raise AssertionError(f"lmlab and HF Llama losses differ by {loss_diff}")
    optimizers = {name: adamw(m) for name, m in (("lmlab", lmlab), ("hf", hf))}
    emulated = emulated_bf16("bf16-mixed", device)
    cpu = torch.device(device).type == "cpu"
    started = time.perf_counter()
    rows = []
    for mode in ("eager", "compiled") if compiled else ("eager",):
        models = {"lmlab": lmlab, "hf": hf}
        if mode == "compiled":
            # As a compiled lmlab run calls it (backward traced without autocast), both sides.
            models = {name: CompiledBackbone(torch.compile(m)) for name, m in models.items()}
        variants = [("fp32", False), ("bf16", False)] + ([("bf16", True)] if emulated else [])
        for dtype, equal_kernels in variants:
            # HF on a CPU without native bf16 (the emulated kernel: ~42 s per step here, eager
            # or compiled, against ~1.6 s in fp32) gets fewer steps and repeats, and in eager no
            # warm-up call: one-time costs vanish in a step that long (compiled still needs one
            # call to compile, ~15 s).
            slow = cpu and dtype == "bf16" and emulated and not equal_kernels
            steps, repeats = (1, min(2, size.repeats)) if slow else (size.steps, training_repeats(size))
            warmup = (1 if cpu else 2) if mode == "compiled" else 0 if slow else 1

            def run(name, models=models, dtype=dtype, steps=steps, equal=equal_kernels):
                for _ in range(steps):
                    _train_step(models[name], ids, labels, optimizers[name], dtype, name == "hf",
                                equal)
            # Compiled: the first call compiles forward and backward; on a GPU a second one
            # settles the allocator and autotuning.
            times = interleaved({n: (lambda n=n: run(n)) for n in models}, repeats,
                                warmup=warmup, device=device)
            tok = {n: size.tokens * steps / t for n, t in times.items()}
            notes = [f"logits equal to {diff:.0e}, losses to {loss_diff:.0e}"] if not rows else []
            if slow:
                notes.append("CPU without bf16 GEMM: HF runs the emulated bf16 kernel, lmlab "
                             "bf16 products on the fp32 one (lmlab.precision); "
                             f"{'' if warmup else 'no warm-up call; '}{repeats} repeats of 1 step")
            if equal_kernels:
                notes.insert(0, EQUAL_KERNELS)
            rows.append(rate_row("train: gqa vs LlamaForCausalLM", f"{dtype} {mode}", tok["lmlab"],
                                 tok["hf"], COMPILED_GOAL if mode == "compiled" else EAGER_GOAL,
                                 notes, cpu_speedup(), paired_speedup()))
            print(f"  train {dtype} {mode}: {rows[-1].ratio:.2f}x wall, "
                  f"{time.perf_counter() - started:.0f} s so far", file=sys.stderr, flush=True)
        torch._dynamo.reset()
    return rows


def generate_rows(size: Size, device: torch.device | str = "cpu") -> list[Row]:
    lmlab, hf, _ = llama_pair(size, device)
    lmlab.eval(), hf.eval()
    prompt = torch.randint(6, size.vocab, (size.batch, size.gen_prompt), device=device)
    mask = torch.ones_like(prompt)
    n = size.gen_new
    out: dict[str, torch.Tensor] = {}

    def run_lmlab():
        out["lmlab"] = generate(lmlab, prompt, mask, max_new_tokens=n, eos_id=None)

    def run_hf():
        with torch.no_grad():
            full = hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
        out["hf"] = full[:, prompt.shape[1]:]

    # The warm-up call, timed: lmlab's first call prepacks the weights (oneDNN on a CPU), which
    # the next calls reuse; a run's evaluation pays it once per validation.
    first = {}
    for name, call in (("lmlab", run_lmlab), ("hf", run_hf)):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        first[name] = time.perf_counter() - start
    times = interleaved({"lmlab": run_lmlab, "hf": run_hf}, size.repeats, warmup=0,
                        device=device)
    same = (out["lmlab"] == out["hf"]).float().mean().item()
    tok = {k: size.batch * n / t for k, t in times.items()}
    row = rate_row("generate: KV-cache greedy vs LlamaForCausalLM.generate",
                   f"fp32, batch {size.batch}, prompt {size.gen_prompt}, {n} new tokens",
                   tok["lmlab"], tok["hf"], GENERATE_GOAL,
                   [f"same tokens: {same:.0%}", "first (warm-up) call: "
                    f"{first['lmlab']:.2f} s vs {first['hf']:.2f} s, prepacking included"],
                   cpu_speedup(), paired_speedup())
    # Both sides do the same work whatever the tokens (fixed length, no early stop). A first
    # token that differs is a wrong prefill; a later divergence can be a near-tie of two logits
    # under other kernels (a GPU's), after which a sequence goes its own way: noted only.
    if not bool((out["lmlab"][:, 0] == out["hf"][:, 0]).all()):
        return [row.refuse("the first generated tokens differ")]
    return [row]
