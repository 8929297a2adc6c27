"""Sharded checkpoint folders → one plain checkpoint (single process; the 2-process versions
with real FSDP2/DeepSpeed shards are in test_multiprocess.py)."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from lmlab.strategies.consolidate import (
    consolidate,
    consolidate_to_file,
    is_complete,
    metadata,
    sharded_kind,
)


def _dcp_folder(path):
    state = {"backbone.w": torch.randn(4, 3), "backbone.b": torch.randn(3).bfloat16(), "tokens_seen": torch.tensor(7)}
    dcp.save({"state_dict": state, "optimizer_0": {"state": {}}}, checkpoint_id=str(path))
    torch.save({"lmlab": {"model": {"d_model": 4}}, "global_step": 2, "epoch": 0, "loops": {}}, path / "meta.pt")
    return state


def test_torch_dcp_folder_consolidates_to_plain_fp32(tmp_path):
    folder = tmp_path / "last.ckpt"
    state = _dcp_folder(folder)
    assert sharded_kind(folder) == "fsdp" and is_complete(folder)
    out = consolidate_to_file(folder, tmp_path / "one.ckpt")
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"state_dict", "lmlab", "global_step", "epoch"}
    torch.testing.assert_close(loaded["state_dict"]["backbone.w"], state["backbone.w"], rtol=0, atol=0)
    assert loaded["state_dict"]["backbone.b"].dtype == torch.float32
    assert int(loaded["state_dict"]["tokens_seen"]) == 7
    assert metadata(folder) == {"lmlab": {"model": {"d_model": 4}}, "global_step": 2, "epoch": 0}
    assert consolidate(folder)["global_step"] == 2


def test_incomplete_folders_are_not_resumable(tmp_path):
    folder = tmp_path / "last.ckpt"
    _dcp_folder(folder)
    (folder / "meta.pt").unlink()
    assert sharded_kind(folder) == "fsdp" and not is_complete(folder)
    (tmp_path / "ds" / "checkpoint").mkdir(parents=True)
    assert sharded_kind(tmp_path / "ds") == "deepspeed" and not is_complete(tmp_path / "ds")
    assert sharded_kind(tmp_path) is None
