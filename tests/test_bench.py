"""Benchmarks are not tests: only check that the quick size runs and prints its table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_tokenizer_bench_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tokenizers.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| kind |" in proc.stdout and "| bpe |" in proc.stdout
