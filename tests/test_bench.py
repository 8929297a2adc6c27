"""Benchmarks are not tests: only check that the quick size runs and prints its table."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmlab.precision import emulated_bf16
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_tokenizer_bench_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tokenizers.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| kind |" in proc.stdout and "| bpe |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| bpe |")
            or line.startswith("| byte |")]
    assert rows and all(line.rstrip(" |").endswith("yes") for line in rows)  # same ids


@pytest.mark.timeout(600)
def test_make_bench_quick_runs_every_bench(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for bench in ("train: gqa vs LlamaForCausalLM", "lightning_vs_raw", "generate: KV-cache",
                  "data_pipeline", "tokenizers: lmlab pipeline", "bert vs BertForMaskedLM",
                  "t5 vs T5ForConditionalGeneration"):
        assert f"| {bench}" in table, bench
    assert "logits equal" in table and "same tokens: 100%" in table
    assert "not comparable" not in table  # every row's two sides computed the same thing
    if emulated_bf16("bf16-mixed", "cpu"):  # bf16 also with HF under lmlab.precision
        assert "bf16 eager (equal kernels" in table
    assert "torch threads" in table.splitlines()[0]  # the header names the machine
    assert "host_memory=keep for both sides" in table.splitlines()[0]


def test_cuda_without_a_gpu_fails_before_any_work(capsys):
    from bench import run

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        run.main(["--device", "cuda", "--quick"])
    with pytest.raises(SystemExit, match="use cpu or cuda"):
        run.main(["--device", "tpu", "--quick"])


def test_rows_report_the_median_of_the_pairs_ratios():
    from bench.common import markdown, paired, rate_row, time_row

    # Pair 0 ran through a slow spell on side a: the pairs' median ignores it, the ratio of the
    # two sides' medians (2.0 / 1.0 in wall time here) would not.
    times = {"a": [(2.0, 4.0), (1.0, 2.0), (3.3, 6.0)], "b": [(1.0, 2.0), (1.0, 2.0), (3.0, 6.0)]}
    assert paired(times, "a", "b") == pytest.approx(1.1)
    assert paired(times, "a", "b", column=1) == pytest.approx(1.0)
    slow = time_row("t", "w", 2.0, 1.0, 1.2, paired_ratio=1.1)
    assert slow.ratio == pytest.approx(1.1) and slow.met
    assert not time_row("t", "w", 2.0, 1.0, 1.2).met  # without pairs: lmlab / reference
    fast = rate_row("r", "w", 100.0, 200.0, 1.05, paired_ratio=1.06)
    assert fast.met and "| 1.06x |" in markdown([fast])


def test_partial_and_cuda_runs_never_replace_the_full_tables():
    # bench/results.md is the full CPU table the README shows, results_cuda.md the hand-written
    # GPU record: `--only` and CUDA runs write tables of their own unless --out says otherwise.
    from bench.run import default_out

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert default_out(cpu, None) == ROOT / "bench" / "results.md"
    assert default_out(cpu, ["train"]) == ROOT / "bench" / "results_train.md"
    assert default_out(cuda, None) == ROOT / "bench" / "results_cuda_table.md"
    assert default_out(cuda, ["loops", "encoders"]).name == "results_cuda_table_loops_encoders.md"
    # Another size than the device's default never replaces the README's tables.
    assert default_out(cpu, None, "gpu").name == "results_gpu.md"
    assert default_out(cpu, None, "cpu").name == "results.md"
    assert default_out(cuda, None, "gpu").name == "results_cuda_table.md"
    assert default_out(cuda, ["train"], "cpu").name == "results_cuda_table_cpu_train.md"


def test_profile_step_sorts_kernels_by_kind_and_counts_the_idle_time():
    from types import SimpleNamespace as Event

    from bench.profile_step import kernel_kinds
    events = [Event(key="nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", self_device_time_total=3000.0),
              Event(key="cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", self_device_time_total=1500.0),
              Event(key="triton_poi_fused_gelu_gelu_backward_view_6", self_device_time_total=400.0),
              # inductor names kernels after what they fuse: an addmm epilogue is elementwise
              # work, a matmul template is a matmul
              Event(key="triton_poi_fused_addmm_gelu_3", self_device_time_total=200.0),
              Event(key="triton_tem_fused_mm_7", self_device_time_total=300.0),
              Event(key="void at::native::multi_tensor_apply_kernel<...>", self_device_time_total=300.0),
              Event(key="Memcpy HtoD (Pageable -> Device)", self_device_time_total=30.0),
              Event(key="aten::mm", self_device_time_total=0.0)]  # host-side op: no device time
    rows = kernel_kinds(events, steps=3, step_ms=2.3)  # 5.73 ms of kernels over 3 steps
    assert rows[2:] == [
        "| matmul | 1.10 | 47.8% |", "| attention | 0.50 | 21.7% |",
        "| inductor (fused elementwise/reductions) | 0.20 | 8.7% |",
        "| optimizer | 0.10 | 4.3% |", "| other | 0.01 | 0.4% |",
        "| device idle (launch gaps, host work) | 0.39 | 17.0% |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_profile_step_without_a_gpu_says_so(capsys):
    from bench.profile_step import main
    assert main(["--ceiling", "--attention", "cudnn", "--variants"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
