"""How the process's C heap treats memory a training step frees (`host_memory` in the config).

A CPU training step allocates and frees the same few hundred MiB of activations and gradients
every step. glibc's malloc hands the top of its heap back to the OS whenever more than
`M_TRIM_THRESHOLD` is free there (by default 2 × a threshold that adapts up to 32 MiB), and
the next step faults every page of it in again. In a Lightning run of the bench model (6
layers, d 384, batch 8 × 256) the heap shrank and regrew by ~60 MiB every step: 23,000 page
faults and 0.17 s of kernel time a step (of ~3.2 s of CPU), against none in a raw loop over the
same module, whose allocation order happened to leave the top in use (`bench/bench_loops.py`).

"keep" (the default) sets the three thresholds explicitly, which also turns the adaptation off:
blocks up to 32 MiB (the largest glibc allows for `M_MMAP_THRESHOLD`) come from the heap, the
heap is trimmed only when 2 GiB lie free at its top, and each growth takes 64 MiB more, so
growing is rare. Setting only the trim threshold would be worse than nothing: the mmap
threshold then stays at 128 KiB, every larger tensor is its own mmap, and the same step took
380,000 faults. The cost: the process keeps its peak heap instead of returning it between
steps, which a training loop reaches again every step anyway. "release" leaves the allocator
as it is (glibc's defaults, in a process where nothing set them). Both apply to the whole
process (DataLoader workers forked later inherit them); on a C library without `mallopt`
(macOS, musl) "keep" does nothing and says so in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from lmlab.errors import ConfigError

log = logging.getLogger("lmlab")

MODES = ("keep", "release")
# mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MAX_HEAP_BLOCK = 32 * 2**20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TOP_PAD = 64 * 2**20
TRIM_ONLY_ABOVE = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB lie free at the top


def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_host_memory(mode: str | None) -> bool:
    """Apply `host_memory` (None = "keep"); True when the heap settings were changed."""
    mode = "keep" if mode is None else mode
    if mode not in MODES:
        raise ConfigError("host_memory", mode, list(MODES))
    if mode == "release":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        log.info("host_memory=keep: this C library has no mallopt; its allocator is left as it is")
        return False
    applied = (mallopt(M_MMAP_THRESHOLD, MAX_HEAP_BLOCK) == 1 and mallopt(M_TOP_PAD, TOP_PAD) == 1
               and mallopt(M_TRIM_THRESHOLD, TRIM_ONLY_ABOVE) == 1)  # 1 = accepted
    if not applied:
        log.info("host_memory=keep: mallopt refused a setting; the allocator may still trim its heap")
    return applied
