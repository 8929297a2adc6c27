"""No host-device synchronisation inside a training step (issue 8), for every model family and
task: the syncs a GPU run would make, found on a CPU by op name (tests.host_syncs).

Reads of what stays on the host on a GPU too (torch's optimizer step counts) are not syncs.
Steps 2-4 of each run are watched, none of them a logging, progress-bar, throughput,
checkpoint or non-finite-check step: those read the device by design, every n steps.
"""

from __future__ import annotations

import pytest
import torch

from lmlab.models.layers.moe import MoEFeedForward, _grouped_kernel_on
from lmlab.train import run
from tests.host_syncs import CudaStepSyncs, StepSyncs

QUIET = [
    "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1000",
    "callbacks.progress_bar.refresh_rate=1000", "callbacks.throughput.log_every_n_steps=1000",
    "callbacks.nonfinite.check_every_n_steps=1000", "callbacks.last_checkpoint.every_n_steps=1000",
    "+callbacks.step_syncs._target_=tests.host_syncs.StepSyncs",
]


def _placed(overrides: list[str], request) -> list[str]:
    """TEACHER and HF stand for the session's teacher checkpoint and tiny HF model directory."""
    out = []
    for o in overrides:
        if o == "TEACHER":
            out.append(f"teacher={request.getfixturevalue('teacher_ckpt')}")
        elif o == "HF":
            hf_dir = request.getfixturevalue("tiny_hf_dir")
            out += ["model=hf", f"model.hf_path={hf_dir}", "tokenizer=hf", f"tokenizer.path={hf_dir}"]
        else:
            out.append(o)
    return out


GROUPED_GEMM_GPU = torch.cuda.is_available() and _grouped_kernel_on(torch.device("cuda"))
# Reads that only happen on a CPU, where they cost nothing (each says so where it is made).
ALLOWED = ("_unless_full",)


@pytest.mark.parametrize("overrides", [
    [],
    ["model=gqa", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0",
     "trainer.accumulate_grad_batches=2", "trainer.max_steps=12"],  # (the bar also refreshes at its total)
    ["model=moe", "model.capacity_factor=1.25"],
    ["model=moe", "model.router=expert_choice"],
    ["model=moe", "model.expert_ffn=swiglu"],  # dropless: grouped GEMMs
    ["model=hybrid", "model.n_layers=4"],
    ["model=bert", "task=mlm", "data=text"],
    ["model=bert", "task=classify", "data=classification", "peft=lora"],
    ["model=t5", "task=seq2seq", "data=parallel"],
    ["task=distill", "TEACHER"],
    ["optimizer=adafactor", "peft=qlora"],
    ["callbacks.nonfinite.policy=skip"],  # the fused AdamW skips a bad step on the device
    ["HF", "peft=lora"],
    ["HF", "peft=prefix"],
    ["HF", "peft=prompt"],
], ids=["gpt", "gqa-bf16-clip-accumulate", "moe-capacity", "moe-expert-choice", "moe-dropless",
        "hybrid", "bert-mlm",
        "bert-classify-lora", "t5-seq2seq", "distill",
        "adafactor-qlora", "skip-policy", "hf-lora", "hf-prefix", "hf-prompt"])
def test_training_steps_never_wait_for_the_device(overrides, make_cfg, request, monkeypatch):
    # MoE layers gather exactly on a CPU, where reading counts is free; watch the GPU's paths.
    monkeypatch.setattr(MoEFeedForward, "gpu_dispatch_on_cpu", True)
    record = run(make_cfg(QUIET + _placed(overrides, request)))
    assert record["status"] == "completed"
    watcher = StepSyncs.latest
    assert watcher is not None and watcher.watched >= 3
    found = {key: n for key, n in watcher.syncs.found.items() if not any(f in key[1] for f in ALLOWED)}
    assert not found, "\n".join(f"{n}x {op} at {where}" for (op, where), n in found.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [
    [], ["model=moe", "model.capacity_factor=1.25"],
    pytest.param(["model=moe"], marks=pytest.mark.skipif(
        not GROUPED_GEMM_GPU, reason="dropless MoE reads its counts off a Hopper GPU (no grouped "
        "bf16 GEMMs taken there)")),
    ["model=bert", "task=mlm", "data=text"],
    ["model=t5", "task=seq2seq", "data=parallel"], ["optimizer=adafactor"], ["HF", "peft=prefix"],
    ["HF", "peft=prompt"],
], ids=["gpt", "moe-capacity", "moe-dropless", "bert-mlm", "t5-seq2seq", "adafactor", "hf-prefix",
        "hf-prompt"])
def test_cuda_training_steps_never_synchronize(overrides, make_cfg, request):
    # CUDA's own sync debug mode over steps 2-4 of a bf16 run on the GPU.
    quiet = [o.replace("tests.host_syncs.StepSyncs", "tests.host_syncs.CudaStepSyncs") for o in QUIET]
    record = run(make_cfg(["trainer=gpu"] + quiet + _placed(overrides, request)))
    assert record["status"] == "completed"
    watcher = StepSyncs.latest
    assert isinstance(watcher, CudaStepSyncs) and watcher.watched >= 3
    assert not watcher.found, "\n".join(f"{n}x {m} at {where}" for (m, where), n in watcher.found.items())
