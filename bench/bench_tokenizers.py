"""How much lmlab's tokenization pipeline costs over calling the tokenizer library directly.

For every tokenizer kind, on tinystories/train_sample_2MiB.txt, times (median of interleaved
repeats, so machine noise hits both sides alike):

  library    the library itself on exactly the strings the pipeline encodes (the text's ~64 KB
             newline-cut pieces, each after the first behind the continuation prefix, e.g. "\n"
             for pipelines that mark a text's start), prepared before the clock starts, in its
             fastest form: `tokenizers` encode_batch_fast (ids as lists), sentencepiece
             encode(list, out_type="numpy"), or plain numpy for byte/char. Both sides use the
             same library object in one process, so the same thread pool (RAYON_NUM_THREADS,
             TOKENIZERS_PARALLELISM; sentencepiece num_threads = CPU count on both)
  pipeline   lmlab.data.token_cache.encode_to_array(tokenizer, text) — what the text data
             module writes to the token memmap: cutting, prefixing, one parallel call per
             group of pieces, dropping the prefix ids, ids into one array of the file's dtype

and prints a markdown table of pipeline / library (goal <= 1.1x) in wall time and in process
CPU time (all threads; on a machine shared with other jobs the steadier measure), as a ratio of
medians and as the median of each repeat's own ratio ("paired"). "same ids": the pipeline's
array equals the library's ids (prefix ids dropped) and the whole text encoded in one call.
`--control` times the library side a second time as a third interleaved variant and prints its
paired ratio to the first: the spread of a call against itself, i.e. how far from 1.00x noise
alone moves a ratio on this machine.

    python bench/bench_tokenizers.py            # 2 MiB, 7 repeats
    python bench/bench_tokenizers.py --quick    # 128 KiB, 5 repeats (< 30 s)
    RAYON_NUM_THREADS=1 python bench/bench_tokenizers.py --repeats 15 --kinds word bpe
    python bench/bench_tokenizers.py --repeats 15 --kinds word bpe --control
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
from typing import Any, NamedTuple

import numpy as np

from lmlab.tokenizers import TOKENIZER_KINDS, Tokenizer, build_tokenizer
from lmlab.tokenizers.base import UNK_ID
from lmlab.tokenizers.chunking import continued_pieces
from lmlab.tokenizers.pipeline import PipelineTokenizer
from lmlab.tokenizers.sentencepiece import SentencePieceTokenizer

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
SAMPLE_S = 0.25
VOCAB_SIZE = 4096


class Direct(NamedTuple):
    """The library side: `prepare()` makes its input before the clock starts, `call(input)`
    is the timed library call, `ids(output)` turns its output into the text's ids (untimed)."""

    prepare: Callable[[], Any]
    call: Callable[[Any], Any]
    ids: Callable[[Any], np.ndarray]


def raw_encoder(tokenizer: Tokenizer, text: str) -> Direct:
    """The library called directly on exactly the strings the pipeline encodes
    (`continued_pieces`), so both sides do the same tokenization work and produce the same ids.

    The strings are made afresh before every repeat, as one real run makes them once: the
    libraries read a `str` through its UTF-8 form, which CPython caches on the object, so
    reusing one list across repeats would let the library skip the UTF-8 conversion (~4 ms per
    2 MiB of this corpus) that the pipeline, given the text, cannot. Only the call is timed:
    dropping the continuation prefix's ids, shifting a file's ids and joining the pieces
    happen after, untimed.
    """
    if isinstance(tokenizer, PipelineTokenizer | SentencePieceTokenizer):
        continuation = tokenizer.continuation
        drop = continuation.drop if continuation else 0

        def ids(out: list[Any]) -> np.ndarray:
            kept = [np.asarray(p[drop:] if i and drop else p, np.int64) for i, p in enumerate(out)]
            return np.concatenate(kept) + tokenizer.id_offset

        def prepare() -> list[str]:
            return continued_pieces(text, continuation)

        if isinstance(tokenizer, PipelineTokenizer):
            library = tokenizer.library
            return Direct(
                prepare,
                lambda strings: [
                    e.ids for e in library.encode_batch_fast(strings, add_special_tokens=False)
                ],
                ids,
            )
        processor, threads = tokenizer.processor, os.cpu_count() or 1
        return Direct(
            prepare,
            lambda strings: processor.encode(strings, out_type="numpy", num_threads=threads),
            ids,
        )
    # byte and char have no library: the reference is the plain numpy computation of the ids
    # (byte: UTF-8 bytes + 6; char: a binary search of the code points in the alphabet, <unk>
    # for those not in it).
    n = tokenizer.num_special_tokens
    if tokenizer.kind == "byte":

        def byte_ids(text: str) -> np.ndarray:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16) + n

        return Direct(lambda: text, byte_ids, lambda out: out)
    alphabet = np.array([ord(c) for c in tokenizer.vocab[n:]])

    def char_ids(text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(alphabet, points), len(alphabet) - 1)
        return np.where(alphabet[pos] == points, pos + n, UNK_ID)

    return Direct(lambda: text, char_ids, lambda out: out)


def build(kind: str, train_text: str, cache: str) -> Tokenizer:
    if kind == "hf":
        return build_tokenizer({"kind": "hf", "path": str(HF_FIXTURE)})
    return build_tokenizer({"kind": kind, "vocab_size": VOCAB_SIZE}, [train_text], cache_dir=cache)


def bench(
    kind: str, tokenizer: Tokenizer, text: str, repeats: int, control: bool = False
) -> dict[str, object]:
    dtype = token_dtype(tokenizer.vocab_size)
    pipeline_encode(tokenizer, text[:1000])  # probes the continuation once, on neither clock
    direct = raw_encoder(tokenizer, text)
    # name -> (input made before the clock starts, the timed call on it)
    variants = {
        "raw": (direct.prepare, direct.call),
        "pipeline": (lambda: text, lambda t: pipeline_encode(tokenizer, t)),
    }
    if control:  # the library side once more: how far noise alone moves a ratio (A/A)
        variants["control"] = (direct.prepare, direct.call)
    names = list(variants)
    # One untimed call each (allocator, caches); a call shorter than SAMPLE_S is repeated
    # within each timed sample, so timer and scheduler jitter do not swamp it (byte, char).
    start = time.perf_counter()
    last: dict[str, object] = {name: call(prepare()) for name, (prepare, call) in variants.items()}
    inner = min(50, max(1, round(SAMPLE_S / max((time.perf_counter() - start) / len(names),
                                                   1e-6))))
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # Interleaved, in a rotating order, so drift and warm-up hit every variant alike.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare, call = variants[name]
            spent_wall = spent_cpu = 0.0
            for _ in range(inner):
                given = prepare()
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                last[name] = call(given)
                spent_cpu += time.process_time() - start_cpu
                spent_wall += time.perf_counter() - start_wall
            cpu[name].append(spent_cpu / inner)
            wall[name].append(spent_wall / inner)
    pipeline = last["pipeline"]
    row: dict[str, object] = {"kind": kind, "tokens": int(pipeline.size)}
    for name in names:
        row[name] = statistics.median(wall[name])
        row[f"{name}_cpu"] = statistics.median(cpu[name])
    # Each repeat's two runs are adjacent in time, so their ratio sees one machine load; the
    # median of those ratios is steadier than a ratio of medians on a shared machine.
    for suffix, times in (("", wall), ("_cpu", cpu)):
        pairs = zip(times["pipeline"], times["raw"], strict=True)
        row[f"paired{suffix}"] = statistics.median(p / max(r, 1e-9) for p, r in pairs)
        if control:
            pairs = zip(times["control"], times["raw"], strict=True)
            row[f"control{suffix}"] = statistics.median(c / max(r, 1e-9) for c, r in pairs)
    # Same ids as the library on the same strings, and as the whole text encoded at once
    # (cutting never changes a token); `pipeline` is in the token file's dtype.
    whole = np.asarray(tokenizer.encode(text), dtype=np.int64)
    row["exact"] = bool(
        pipeline.dtype == dtype
        and np.array_equal(pipeline, direct.ids(last["raw"]))
        and np.array_equal(pipeline, whole)
    )
    row["mb_per_s"] = len(text.encode("utf-8")) / 1e6 / row["pipeline"]
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    control = all("control" in r for r in rows)
    header = (
        "| kind | tokens | library s (cpu s) | pipeline s (cpu s) | pipeline / library: wall, "
        "cpu | paired: wall, cpu | pipeline MB/s | same ids |"
        + (" library / itself, paired: wall, cpu |" if control else "")
    )
    lines = [header, "|---|---|---|---|---|---|---|---|" + ("---|" if control else "")]
    for r in rows:
        cells = [r["kind"], f"{r['tokens']:,}"]
        for name in ("raw", "pipeline"):
            cells.append(f"{r[name]:.3f} ({r[name + '_cpu']:.3f})")
        cells.append(
            f"{r['pipeline'] / max(r['raw'], 1e-9):.2f}x, "
            f"{r['pipeline_cpu'] / max(r['raw_cpu'], 1e-9):.2f}x"
        )
        cells.append(f"{r['paired']:.2f}x, {r['paired_cpu']:.2f}x")
        cells += [f"{r['mb_per_s']:.1f}", "yes" if r["exact"] else "no"]
        if control:
            cells.append(f"{r['control']:.2f}x, {r['control_cpu']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 KiB and 5 repeats (< 30 s)")
    parser.add_argument(
        "--kinds", nargs="+", default=list(TOKENIZER_KINDS), choices=TOKENIZER_KINDS
    )
    parser.add_argument("--repeats", type=int, default=None, help="default: 7 (quick: 5)")
    parser.add_argument(
        "--control", action="store_true", help="also time the library against itself (A/A)"
    )
    args = parser.parse_args()
    corpus = CORPUS.read_text(encoding="utf-8")
    text = corpus[: 128 * 1024] if args.quick else corpus
    repeats = args.repeats or (5 if args.quick else 7)
    train_chars = 100_000 if args.quick else TRAIN_CHARS
    parallelism = ", ".join(
        f"{var}={os.environ.get(var, 'unset')}"
        for var in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    )
    print(
        f"corpus {CORPUS.name}: {len(text.encode()) / 2**20:.2f} MiB, {repeats} repeats, "
        f"{os.cpu_count()} CPUs, {parallelism}\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for kind in args.kinds:
            tokenizer = build(kind, corpus[:train_chars], cache)
            rows.append(bench(kind, tokenizer, text, repeats, args.control))
    print(markdown(rows))


if __name__ == "__main__":
    main()
