"""Safe loading: only tensors and plain data are ever unpickled."""

from __future__ import annotations

import os

import pytest
import torch

from lmlab import ConfigError
from lmlab.checkpoint import ResumeSource, read_checkpoint
from lmlab.models import ModelConfig
from lmlab.tokenizers import build_tokenizer


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


def test_resuming_may_switch_compilation_but_not_the_architecture(tmp_path):
    """model.compile / model.compile_mode change how steps run, not a tensor: a resumed run may
    pick another mode (e.g. CUDA graphs once the first run showed the host is the bottleneck)."""
    saved = ModelConfig(vocab_size=300).to_dict()
    source = ResumeSource(tmp_path / "last.ckpt", build_tokenizer({"kind": "byte"}), saved,
                          {"method": "none"})
    source.check_matches({**saved, "compile": True, "compile_mode": "reduce-overhead"},
                         {"method": "none"}, {})
    with pytest.raises(ConfigError) as info:
        source.check_matches({**saved, "d_model": 256}, {"method": "none"}, {})
    assert info.value.field == "model.d_model"
