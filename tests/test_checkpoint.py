"""Safe loading: only tensors and plain data are ever unpickled."""

from __future__ import annotations

import os

import pytest
import torch

from lmlab import ConfigError
from lmlab.checkpoint import read_checkpoint


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "lmlab": {"model": _Payload()}}, path)
    with pytest.raises(ConfigError, match="refused: the file holds pickled Python objects") as info:
        read_checkpoint(path, "init_from")
    assert info.value.field == "init_from"


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.ckpt", "init_from")
    (tmp_path / "half.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_checkpoint(tmp_path / "half.ckpt", "ckpt_path")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="not an lmlab checkpoint"):
        read_checkpoint(tmp_path / "plain.pt", "init_from")
