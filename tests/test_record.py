"""The run record: atomic JSON, versions, git commit, non-finite numbers kept visible."""

from __future__ import annotations

import math

import torch

from lmlab.record import base_record, git_commit, read_record, write_record


def test_write_and_read_back(tmp_path):
    record = base_record(["model=gqa"])
    record["metrics"] = {"val/loss": torch.tensor(1.5), "val/ppl": math.inf}
    write_record(tmp_path, record)
    back = read_record(tmp_path)
    assert back["metrics"] == {"val/loss": 1.5, "val/ppl": "inf"}
    assert back["overrides"] == ["model=gqa"]
    assert back["versions"]["torch"] and back["versions"]["python"].startswith("3.")
    assert not list(tmp_path.glob(".*tmp*")), "no temp file left behind"


def test_git_commit_outside_a_repo_is_none(tmp_path):
    assert git_commit(tmp_path) is None
