"""lmlab `model=gqa` vs transformers' LlamaForCausalLM with the same dimensions and weights.

The lmlab backbone is built, exported with `lmlab.models.hf.export_hf` and loaded by
`LlamaForCausalLM.from_pretrained`, and the logits are checked equal before anything is timed.

- train: tokens/s of a full training step (forward, fp32 cross-entropy, backward, fused AdamW
  on both sides: the default of lmlab and of the HF Trainer) in fp32 and bf16 autocast, both
  eager (both use SDPA) and both under `torch.compile` (the step's model call; lmlab's
  `model.compile=true` does the same). HF computes its loss the way its users call it
  (`labels=`).
- generate: greedy decoding with a KV cache, `lmlab.models.generation.generate` vs
  `LlamaForCausalLM.generate` (no early stop), tokens/s of new tokens; the tokens are compared.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from bench.common import Row, Size, adamw, causal_lm_loss, cpu_speedup, interleaved, rate_row
from lmlab.models import ModelConfig, build_backbone
from lmlab.models.generation import generate
from lmlab.models.hf import export_hf

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
EAGER_GOAL, COMPILED_GOAL, GENERATE_GOAL = 1.05, 1.10, 1.2


def gqa_config(size: Size) -> ModelConfig:
    """`conf/model/gqa.yaml` at the bench dimensions (untied, as Llama)."""
    return ModelConfig(vocab_size=size.vocab, d_model=size.d_model, n_layers=size.n_layers,
                       n_heads=size.n_heads, n_kv_heads=size.n_kv_heads, d_ff=size.d_ff,
                       ffn="swiglu", norm="rmsnorm", position="rope", bias=False,
                       tie_embeddings=False, max_seq_len=max(size.seq_len,
                                                             size.gen_prompt + size.gen_new))


def llama_pair(size: Size) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(lmlab backbone, LlamaForCausalLM with the same weights, max |logit difference|)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = gqa_config(size)
    lmlab = build_backbone(config)
    with tempfile.TemporaryDirectory() as directory:
        export_hf(lmlab, config, directory)
        hf = LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
    ids = torch.randint(0, size.vocab, (2, min(size.seq_len, 64)))
    with torch.no_grad():
        diff = (lmlab(ids) - hf(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"lmlab and HF Llama logits differ by {diff}: not the same model")
    return lmlab.train(), hf.train(), diff


def _train_step(model, ids, optimizer, dtype, hf: bool) -> None:
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss if hf else causal_lm_loss(model(ids), ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_rows(size: Size, compiled: bool = True) -> list[Row]:
    """Eager rows, then (with `compiled`) the compiled ones; `--quick` leaves compilation
    out (minutes of inductor codegen on a 2-core machine)."""
    lmlab, hf, diff = llama_pair(size)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq_len))
    optimizers = {name: adamw(m) for name, m in (("lmlab", lmlab), ("hf", hf))}
    # Without native bf16 (AVX512-BF16/AMX) a CPU emulates it, ~8x slower than fp32 here:
    # fewer steps and repeats keep `make bench` within minutes.
    emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    rows = []
    for mode in ("eager", "compiled") if compiled else ("eager",):
        models = {"lmlab": lmlab, "hf": hf}
        if mode == "compiled":
            models = {name: torch.compile(m) for name, m in models.items()}
        for dtype in ("fp32", "bf16"):
            slow = dtype == "bf16" and emulated
            steps, repeats = (1, min(3, size.repeats)) if slow else (size.steps, size.repeats)

            def run(name, models=models, dtype=dtype, steps=steps):
                for _ in range(steps):
                    _train_step(models[name], ids, optimizers[name], dtype, name == "hf")
            times = interleaved({n: (lambda n=n: run(n)) for n in models}, repeats,
                                warmup=2 if mode == "compiled" else 1)
            tok = {n: size.tokens * steps / t for n, t in times.items()}
            notes = [f"logits equal to {diff:.0e}"] if not rows else []
            if slow:
                notes.append(f"CPU without native bf16: emulated; {repeats} repeats of 1 step")
            rows.append(rate_row("train: gqa vs LlamaForCausalLM", f"{dtype} {mode}", tok["lmlab"],
                                 tok["hf"], COMPILED_GOAL if mode == "compiled" else EAGER_GOAL,
                                 notes, cpu_speedup()))
        torch._dynamo.reset()
    return rows


def generate_rows(size: Size) -> list[Row]:
    lmlab, hf, _ = llama_pair(size)
    lmlab.eval(), hf.eval()
    prompt = torch.randint(6, size.vocab, (size.batch, size.gen_prompt))
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

    times = interleaved({"lmlab": run_lmlab, "hf": run_hf}, size.repeats)
    same = (out["lmlab"] == out["hf"]).float().mean().item()
    tok = {k: size.batch * n / t for k, t in times.items()}
    return [rate_row("generate: KV-cache greedy vs LlamaForCausalLM.generate",
                     f"fp32, batch {size.batch}, prompt {size.gen_prompt}, {n} new tokens",
                     tok["lmlab"], tok["hf"], GENERATE_GOAL, [f"same tokens: {same:.0%}"],
                     cpu_speedup())]
