"""What every benchmark shares: the sizes, interleaved timing, result rows and the table.

Every comparison runs both sides in one process, alternating them repeat by repeat in a
rotating order (so drift, thermal state and other jobs on the machine hit both alike), and
reports the median of each side. Ratios are lmlab / reference for rates (> 1 = lmlab faster)
and reference-relative time where the goal is about overhead (said in the row).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.data.collate import IGNORE_INDEX


@dataclass(frozen=True)
class Size:
    """Model and batch dimensions of one bench size."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    batch: int
    seq_len: int
    repeats: int
    steps: int  # training steps per timed repeat
    gen_prompt: int
    gen_new: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


# The CPU dimensions; `--quick` only checks that everything runs.
FULL = Size(n_layers=6, d_model=384, n_heads=6, n_kv_heads=2, d_ff=1024, vocab=8192, batch=8,
            seq_len=256, repeats=5, steps=2, gen_prompt=32, gen_new=64)
QUICK = Size(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab=512, batch=2,
             seq_len=32, repeats=2, steps=1, gen_prompt=8, gen_new=8)
# `--size gpu`: the CPU dimensions keep an H100 mostly idle (launch overhead dominates), so a
# GPT-2-small-sized model (the MFU check: 12 layers, d_model 768, 12 heads, T = 1024)
# with GQA (4 KV heads), a Llama-sized vocabulary and more steps per repeat.
GPU = Size(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_ff=2048, vocab=32768, batch=16,
           seq_len=1024, repeats=5, steps=5, gen_prompt=128, gen_new=128)
SIZES = {"cpu": FULL, "quick": QUICK, "gpu": GPU}


def training_repeats(size: Size) -> int:
    """Repeats of the training rows against HF (train, encoders): 4 more than the size's, as
    their 5-10 % goals are within what 5 repeats moved between two quiet runs of the same code
    (gqa fp32: 1.09x and 1.03x; bert same work: 0.97x and 1.05x minutes apart)."""
    return size.repeats + 4


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously: without this a timer
    measures the launches, not the work)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device | str, dtype: str):
    """bf16 autocast on `device` for dtype "bf16", nothing for "fp32"."""
    device = torch.device(device)
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Row:
    """One comparison of the results table."""

    bench: str
    what: str
    lmlab: float
    reference: float
    unit: str  # "tok/s": ratio = lmlab / reference; "s": ratio = lmlab time / reference time
    goal: str
    met: bool | None
    notes: list[str] = field(default_factory=list)
    cpu_ratio: float | None = None  # the same ratio in process CPU time (steadier under load)
    # Where the two sides alternate step by step: the median of each pair's ratio, which a slow
    # spell of the machine moves far less than the ratio of the two sides' medians.
    paired_ratio: float | None = None

    def refuse(self, reason: str) -> Row:
        """The two sides did not compute the same thing: the row is not met, whatever the
        times say, and says why."""
        self.met = False
        self.notes.append(f"not comparable: {reason}")
        return self

    @property
    def ratio(self) -> float:
        if self.paired_ratio is not None:
            return self.paired_ratio
        return self.lmlab / self.reference if self.reference else float("nan")


def rate_row(bench: str, what: str, lmlab: float, reference: float, goal: float,
             notes: list[str] | None = None, cpu_ratio: float | None = None,
             paired_ratio: float | None = None) -> Row:
    """Rates (higher is better): met when the ratio (`paired_ratio` if given, else lmlab /
    reference) >= goal."""
    row = Row(bench, what, lmlab, reference, "tok/s", f">= {goal:.2f}x", None, notes or [],
              cpu_ratio, paired_ratio)
    row.met = row.ratio >= goal if reference else None
    return row


def time_row(bench: str, what: str, lmlab: float, reference: float, goal: float,
             notes: list[str] | None = None, cpu_ratio: float | None = None,
             paired_ratio: float | None = None) -> Row:
    """Times (lower is better): met when the ratio (`paired_ratio` if given, else lmlab /
    reference) <= goal."""
    row = Row(bench, what, lmlab, reference, "s", f"<= {goal:.2f}x", None, notes or [],
              cpu_ratio, paired_ratio)
    row.met = row.ratio <= goal if reference else None
    return row


def paired(times: dict[str, list[tuple[float, float]]], side: str, reference: str,
           column: int = 0) -> float:
    """Median of side[i] / reference[i] over alternating steps i; column 0 = wall, 1 = CPU."""
    return statistics.median(a[column] / b[column]
                             for a, b in zip(times[side], times[reference], strict=True))


# Every timed call of the last `interleaved` call, (wall, process CPU) seconds per variant in
# round order: round r of two variants ran back to back, so their ratio is paired. CPU time
# (all threads) is the steadier measure on a machine shared with other jobs (wall time includes
# waiting for a core); it is NaN on CUDA, where the host mostly waits for the GPU.
LAST_ROUNDS: dict[str, list[tuple[float, float]]] = {}


def interleaved(variants: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 1, device: torch.device | str | None = None) -> dict[str, float]:
    """Median wall seconds of each variant over `repeats` interleaved calls, after `warmup`
    untimed calls each (compilation, allocator, caches); every call's times in `LAST_ROUNDS`.

    On a CUDA `device` every timed call starts and ends with a synchronisation, and no CPU
    time is kept (the host mostly waits for the GPU there, so its CPU time says nothing)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    synchronize(device)
    on_cpu = device is None or torch.device(device).type == "cpu"
    LAST_ROUNDS.clear()
    LAST_ROUNDS.update({name: [] for name in names})
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            synchronize(device)
            cpu = time.process_time() - start_cpu if on_cpu else math.nan
            LAST_ROUNDS[name].append((time.perf_counter() - start, cpu))
    return {name: statistics.median(w for w, _ in rounds) for name, rounds in LAST_ROUNDS.items()}


def cpu_speedup(reference: str = "hf", lmlab: str = "lmlab") -> float | None:
    """The median over the last `interleaved` call's rounds of reference CPU time / lmlab CPU
    time (a rate ratio); None when it kept none (a CUDA run)."""
    if math.isnan(LAST_ROUNDS[lmlab][0][1]):
        return None
    return paired(LAST_ROUNDS, reference, lmlab, column=1)


def paired_speedup(reference: str = "hf", lmlab: str = "lmlab") -> float:
    """The median over the last `interleaved` call's rounds of reference wall time / lmlab wall
    time: the rate ratio of the rows, which a slow spell of the machine moves far less than the
    ratio of the two sides' medians (the train rows' 5-10 % goals: the same code read 1.03x
    and 1.30x in two runs by the ratio of medians)."""
    return paired(LAST_ROUNDS, reference, lmlab)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The same optimizer on both sides: fused AdamW is lmlab's default (conf/optimizer/adamw)
    and the transformers Trainer's (`adamw_torch_fused` on torch >= 2.8)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """What lmlab's collators give for a window `ids`: position t predicts ids[t + 1], the last
    position predicts nothing (IGNORE_INDEX), so both sides score the same T - 1 tokens
    (HF's `labels=ids` shifts the same way inside the model)."""
    return torch.cat((ids[:, 1:], ids.new_full((ids.shape[0], 1), IGNORE_INDEX)), dim=1)


def markdown(rows: list[Row]) -> str:
    lines = ["| bench | comparison | lmlab | reference | ratio | ratio in CPU time | goal | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = ((lambda v: f"{v:,.0f} tok/s") if r.unit == "tok/s" else
                (lambda v: f"{v:.4f} s" if v >= 0.01 else f"{v * 1e3:.3f} ms"))
        fmt = lambda v, unit=unit: "—" if math.isnan(v) else unit(v)  # noqa: E731
        met = "—" if r.met is None else ("yes" if r.met else "no")
        what = r.what + (f" ({'; '.join(r.notes)})" if r.notes else "")
        cpu = "—" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}x"
        ratio = "—" if math.isnan(r.ratio) else f"{r.ratio:.2f}x"
        lines.append(f"| {r.bench} | {what} | {fmt(r.lmlab)} | {fmt(r.reference)} | "
                     f"{ratio} | {cpu} | {r.goal} | {met} |")
    return "\n".join(lines)
