"""Four jobs started at once on the same tokenizer and tokenized-data cache: each artefact is
built once, none is corrupted, every job finishes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHAKESPEARE, TINY_MODEL, TINY_TEXT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_four_jobs_share_one_cache(tmp_path):
    cache = tmp_path / "cache"
    args = ["debug=fast", *TINY_MODEL, *TINY_TEXT, "data=text", f"data.path={SHAKESPEARE}", "tokenizer=bpe",
            "tokenizer.vocab_size=300", f"paths.cache_dir={cache}", "print_config=false",
            "trainer.enable_progress_bar=false"]
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"seed={i}",
                          f"hydra.run.dir={tmp_path / f'job{i}'}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=540)
        assert proc.returncode == 0, err[-3000:]
    records = [json.loads((tmp_path / f"job{i}" / "metrics.json").read_text()) for i in range(4)]
    assert all(r["status"] == "completed" for r in records)
    entries = [p for p in (cache / "tokenizers").iterdir() if p.is_dir()]
    assert len(entries) == 1, entries  # one tokenizer, trained once
    token_files = sorted(p.name for p in (cache / "tokens").glob("*.bin"))
    assert len(token_files) == 3  # train/val/test of the one corpus, encoded once
    assert not list(cache.rglob("*.tmp*")), "a temporary file was left behind"
    saved = [(tmp_path / f"job{i}" / "tokenizer" / "tokenizer.json").read_text() for i in range(4)]
    assert len(set(saved)) == 1
