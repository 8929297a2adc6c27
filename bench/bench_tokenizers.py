"""How much lmlab's tokenization pipeline costs over calling the tokenizer library directly.

For every tokenizer kind, on tinystories/train_sample_2MiB.txt, times (median of interleaved
repeats, so machine noise hits all variants alike):

  raw        the library itself on the same 64 KB newline-cut chunks, in its fastest form:
             `tokenizers` encode_batch_fast (ids as lists), sentencepiece encode(list,
             out_type="numpy"), or plain numpy for byte/char
  pipeline   lmlab.data.token_cache.encode_to_array(tokenizer, text) — what the text data
             module runs
  array      Tokenizer.encode_to_array(text) — the tokenizer's own whole-text path

and prints a markdown table of pipeline/raw and array/raw (goal <= 1.1x), in wall time and in
process CPU time (all threads; on a machine shared with other jobs it is the steadier measure
of what the encoding itself costs). "exact" says whether
the pipeline's ids equal the whole text encoded at once (cutting a text can change the tokens
at the cuts; encode_to_array never does).

    python bench/bench_tokenizers.py            # 2 MiB, 7 repeats
    python bench/bench_tokenizers.py --quick    # 128 KiB, 5 repeats (< 30 s)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmlab.tokenizers import TOKENIZER_KINDS, Tokenizer, build_tokenizer
from lmlab.tokenizers.chunking import split_text

ROOT = Path(__file__).resolve().parents[1]


def _token_cache_module():
    # Loaded from its file: importing it as lmlab.data.token_cache runs lmlab/data/__init__,
    # which imports Lightning (seconds, and nothing here needs it).
    path = ROOT / "src" / "lmlab" / "data" / "token_cache.py"
    spec = importlib.util.spec_from_file_location("lmlab_bench_token_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_token_cache = _token_cache_module()
pipeline_encode, token_dtype = (
    _token_cache.encode_to_array,
    _token_cache.token_dtype,
)
CORPUS = (ROOT / ".." / "shared" / "data" / "tinystories" / "train_sample_2MiB.txt").resolve()
HF_FIXTURE = ROOT / "tests" / "tokenizers" / "fixtures" / "gpt2_style" / "tokenizer.json"
TRAIN_CHARS = 300_000
VOCAB_SIZE = 4096


def raw_encoder(tokenizer: Tokenizer) -> Callable[[list[str]], object]:
    """The library call lmlab wraps, applied to chunks, returning ids (lists or an array)."""
    if hasattr(tokenizer, "library"):
        library = tokenizer.library
        return lambda chunks: [
            e.ids for e in library.encode_batch_fast(chunks, add_special_tokens=False)
        ]
    if hasattr(tokenizer, "processor"):
        processor, threads = tokenizer.processor, os.cpu_count() or 1
        return lambda chunks: processor.encode(chunks, out_type="numpy", num_threads=threads)
    # byte and char have no library: the reference is the plain numpy computation of the ids
    # (byte: UTF-8 bytes + 6; char: a binary search of the code points in the alphabet).
    if tokenizer.kind == "byte":
        return lambda chunks: (
            np.frombuffer("".join(chunks).encode("utf-8"), dtype=np.uint8).astype(np.uint16)
            + tokenizer.num_special_tokens
        )
    alphabet = np.array([ord(c) for c in tokenizer.vocab[tokenizer.num_special_tokens :]])
    return lambda chunks: (
        np.searchsorted(
            alphabet, np.frombuffer("".join(chunks).encode("utf-32-le"), dtype=np.uint32)
        )
        + tokenizer.num_special_tokens
    )


def build(kind: str, train_text: str, cache: str) -> Tokenizer:
    if kind == "hf":
        return build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE)})
    return build_tokenizer({"kind": kind, "vocab_size": VOCAB_SIZE}, [train_text], cache_dir=cache)


def bench(kind: str, tokenizer: Tokenizer, text: str, repeats: int) -> dict[str, object]:
    chunks = split_text(text)  # the same cuts the pipeline makes, fed to the library directly
    dtype = token_dtype(tokenizer.vocab_size)
    raw = raw_encoder(tokenizer)
    variants = {
        "raw": lambda: raw(chunks),
        "pipeline": lambda: pipeline_encode(tokenizer, text),
        "array": lambda: tokenizer.encode_to_array(text, dtype),
    }
    names = list(variants)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, object] = {}
    for r in range(repeats):
        # Interleaved, in a rotating order, so drift and warm-up hit every variant alike.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            last[name] = variants[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    row: dict[str, object] = {"kind": kind, "tokens": int(last["array"].size)}
    for name in names:
        row[name] = statistics.median(wall[name])
        row[f"{name}_cpu"] = statistics.median(cpu[name])
    row["exact"] = bool(np.array_equal(last["pipeline"], last["array"]))
    row["mb_per_s"] = len(text.encode("utf-8")) / 1e6 / row["array"]
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    header = (
        "| kind | tokens | raw s (cpu s) | pipeline s (cpu s) | pipeline / raw: wall, cpu | "
        "encode_to_array s (cpu s) | array / raw: wall, cpu | array MB/s | pipeline exact |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["kind"], f"{r['tokens']:,}"]
        for name in ("raw", "pipeline", "array"):
            cells.append(f"{r[name]:.3f} ({r[name + '_cpu']:.3f})")
            if name != "raw":
                wall_ratio = r[name] / max(r["raw"], 1e-9)
                cpu_ratio = r[name + "_cpu"] / max(r["raw_cpu"], 1e-9)
                cells.append(f"{wall_ratio:.2f}x, {cpu_ratio:.2f}x")
        cells += [f"{r['mb_per_s']:.1f}", "yes" if r["exact"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 KiB and 5 repeats (< 30 s)")
    parser.add_argument(
        "--kinds", nargs="+", default=list(TOKENIZER_KINDS), choices=TOKENIZER_KINDS
    )
    args = parser.parse_args()
    corpus = CORPUS.read_text(encoding="utf-8")
    text = corpus[: 128 * 1024] if args.quick else corpus
    repeats = 5 if args.quick else 7
    train_chars = 100_000 if args.quick else TRAIN_CHARS
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    print(
        f"corpus {CORPUS.name}: {len(text.encode()) / 2**20:.2f} MiB, {repeats} repeats, "
        f"{os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM={parallelism}\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for kind in args.kinds:
            tokenizer = build(kind, corpus[:train_chars], cache)
            rows.append(bench(kind, tokenizer, text, repeats))
    print(markdown(rows))


if __name__ == "__main__":
    main()
