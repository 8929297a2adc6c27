"""`make bench`: every comparison of issue 8 as one markdown table of ratios.

    python -m bench.run                     # CPU dimensions (6 layers, d_model 384, ...), writes bench/results.md
    python -m bench.run --quick             # tiny sizes, a check that everything runs (CI)
    python -m bench.run --only train generate
    python -m bench.run --device cuda       # on a GPU, at a GPU-sized model (--size gpu)

Each comparison is measured side by side in this one process (interleaved repeats, median;
see bench/common.py). Numbers depend on the machine and on what else runs on it: the header
of the table says where it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import SIZES, Row, Size, markdown, time_row, training_repeats  # noqa: E402
from lmlab.host_memory import MODES as HOST_MEMORY_MODES  # noqa: E402
from lmlab.host_memory import set_host_memory  # noqa: E402


def _train(size: Size, quick: bool, device: torch.device) -> list[Row]:
    from bench.bench_llama import train_rows

    return train_rows(size, compiled=not quick, device=device)


def _generate(size: Size, quick: bool, device: torch.device) -> list[Row]:
    from bench.bench_llama import generate_rows

    return generate_rows(size, device)


def _loops(size: Size, quick: bool, device: torch.device) -> list[Row]:
    from bench.bench_loops import rows

    return rows(size, device)


def _encoders(size: Size, quick: bool, device: torch.device) -> list[Row]:
    from bench.bench_encoders import rows

    return rows(size, device)


def _tokenizers(size: Size, quick: bool, device: torch.device) -> list[Row]:
    """bench_tokenizers.py's comparison (pipeline / raw library call, wall time); tokenizers
    run on the CPU whatever the device."""
    import tempfile

    from bench import bench_tokenizers as bt

    corpus = bt.CORPUS.read_text(encoding="utf-8")
    text = corpus[: 128 * 1024] if quick else corpus
    kinds = ["bpe", "byte"] if quick else [k for k in bt.TOKENIZER_KINDS if k != "hf"]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for kind in kinds:
            tokenizer = bt.build(kind, corpus[: 100_000 if quick else bt.TRAIN_CHARS], cache)
            # 15 repeats: the library call alone varies by up to 7 % against itself here
            # (`bench_tokenizers.py --control`), as much as the gap the goal is about.
            r = bt.bench(kind, tokenizer, text, TOKENIZER_REPEATS[quick])
            # Ratios: the median of each repeat's own ratio, steadier under load than the ratio
            # of medians, as in every row.
            learned = "" if kind in ("byte", "char") else f", vocab {bt.VOCAB_SIZE}"
            row = time_row("tokenizers: lmlab pipeline vs the library", f"{kind}, "
                           f"{len(text.encode()) / 2**20:.2f} MiB{learned}", r["pipeline"], r["raw"], 1.1,
                           [NO_LIBRARY] if kind in ("byte", "char") else [], r["paired_cpu"],
                           r["paired"])
            rows.append(row if r["exact"] else row.refuse("the ids differ from the reference's"))
    return rows


TOKENIZER_REPEATS = {False: 15, True: 2}  # by quick
NO_LIBRARY = ("no library encodes byte/char: the reference is the plain numpy computation of the "
              "ids")

BENCHES: dict[str, Callable[[Size, bool, torch.device], list[Row]]] = {
    "train": _train,          # 1. gqa vs LlamaForCausalLM, fp32/bf16, eager/compiled
    "loops": _loops,          # 2. Lightning vs raw loop, 4. data pipeline vs resident
    "generate": _generate,    # 3. KV-cache greedy vs HF generate
    "tokenizers": _tokenizers,  # 5. pipeline vs library
    "encoders": _encoders,    # 6. bert, t5 vs HF
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return (f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads)")


def header(size: Size, size_name: str, device: torch.device, host_memory: str) -> str:
    what = {"quick": "quick sizes", "cpu": "CPU dimensions", "gpu": "GPU dimensions"}[size_name]
    return (f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
            f"{device_name(device)}, torch {torch.__version__}; "
            f"{what}: {size.n_layers} layers, d_model "
            f"{size.d_model}, {size.n_heads} heads ({size.n_kv_heads} KV), FFN {size.d_ff}, vocab "
            f"{size.vocab}, batch {size.batch}x{size.seq_len}; median of {size.repeats} "
            f"interleaved repeats of {size.steps} step(s) unless a row says otherwise (train and "
            f"encoders: {training_repeats(size)}; tokenizers: {TOKENIZER_REPEATS[size_name == 'quick']}); "
            f"host_memory={host_memory} for both sides. Ratio = lmlab / "
            "reference: the median of the ratios of the repeats' pairs (the two sides run back "
            "to back), in wall and in process CPU time; lmlab and reference columns: medians.")


def default_out(device: torch.device, only: list[str] | None, size_name: str | None = None
                ) -> Path:
    """bench/results.md for a full CPU run at the CPU size (the table the README shows); a
    partial run (`--only`) or another size gets a file of its own, so it never replaces the
    full table; a CUDA run's table goes to results_cuda_table*.md, beside the hand-written
    results_cuda.md (the size is in the name when it is not the device's default)."""
    stem = "results" if device.type == "cpu" else "results_cuda_table"
    size = "" if size_name in (None, default_size(device)) else f"_{size_name}"
    return ROOT / "bench" / f"{stem}{size}{''.join('_' + name for name in only or [])}.md"


def default_size(device: torch.device) -> str:
    """`--size` when none is given: the issue's CPU dimensions on a CPU, the GPT-2-small-sized
    model on a GPU (the CPU dimensions leave an H100 mostly idle)."""
    return "gpu" if device.type == "cuda" else "cpu"


def resolve_device(name: str) -> torch.device:
    """`--device`: cpu, cuda or cuda:N; a clear error when CUDA is asked for and absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available here (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); "
                             "run on a GPU machine or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: use cpu or cuda[:N]")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (CI: checks it runs); the same as --size quick")
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="cpu: the issue's CPU dimensions (default on a CPU); gpu: a "
                        "GPT-2-small-sized model (default with --device cuda); quick: tiny")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: models and batches of every bench but "
                        "tokenizers go there")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: bench/results.md for a full CPU "
                        "run, bench/results_<parts>.md with --only, "
                        "bench/results_cuda_table[_<parts>].md on CUDA, none with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); on a machine busy with "
                        "other jobs, 1 avoids threads spinning against each other")
    parser.add_argument("--host-memory", choices=list(HOST_MEMORY_MODES), default="keep",
                        help="the C heap setting of the bench process, as `host_memory` sets it "
                        "for a run (default keep, the run's default); process-wide, so both "
                        "sides of every row run with it")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    set_host_memory(args.host_memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    size_name = "quick" if args.quick else (args.size or default_size(device))
    size = SIZES[size_name]
    out = args.out or (None if size_name == "quick" else default_out(device, args.only, size_name))
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.only or list(BENCHES):
        t0 = time.perf_counter()
        rows += BENCHES[name](size, size_name == "quick", device)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    text = (f"{header(size, size_name, device, args.host_memory)} "
            f"Total {time.perf_counter() - started:.0f} s.\n\n"
            f"{markdown(rows)}\n")
    print(text)
    if out is not None:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
