"""host_memory: what the heap settings do to a step's page faults (in fresh processes: mallopt
is process-wide) and the config error."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lmlab.errors import ConfigError
from lmlab.host_memory import set_host_memory

# A step's worth of activations: six 8 MiB tensors at once, freed together, eight times. With
# glibc's defaults the freed top of the heap (48 MiB > the adaptive 16 MiB trim threshold) goes
# back to the OS each time and is faulted in again; kept, the later rounds fault nothing.
STEP = """
import resource, sys, torch
from lmlab.host_memory import set_host_memory
applied = set_host_memory(sys.argv[1])
def step():
    ts = [torch.ones(2 * 2**20) for _ in range(6)]
    return float(sum(t[-1] for t in ts))
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt and these thresholds are glibc's")
def test_keep_stops_the_heap_from_being_refaulted_every_step():
    applied, kept = _faults("keep")
    not_applied, released = _faults("release")
    assert applied and not not_applied
    # Trimmed: up to 8 rounds x 48 MiB = 98,000 pages (measured 49,000-98,000, as the adaptive
    # thresholds settle); kept: none, or one growth of the heap (1,024).
    assert released > 30_000, released
    assert kept < released / 20, (kept, released)


@pytest.mark.parametrize("mode", ["forever", "", "KEEP"])
def test_unknown_mode_is_a_config_error(mode):
    with pytest.raises(ConfigError, match="host_memory.*keep.*release"):
        set_host_memory(mode)
