"""A resumed run continues exactly where it stopped with the new optimizers' state too (the
8-bit moments and their quantisation maps travel through last.ckpt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.train import run

pytestmark = pytest.mark.slow


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor", "lamb"])
def test_stopped_and_resumed_run_equals_a_straight_run(make_cfg, optimizer):
    # d_model 64: the 64x64 projections and the embedding reach min_8bit_size (4,096 elements)
    common = [f"optimizer={optimizer}", "scheduler=constant", "model.d_model=64", "model.n_layers=1",
              "trainer.val_check_interval=3", "callbacks.last_checkpoint.every_n_steps=3"]
    straight = make_cfg([*common, "trainer.max_steps=6"], name="straight")
    run(straight)
    first = make_cfg([*common, "trainer.max_steps=3"], name="stopped")
    run(first)
    if optimizer == "adamw8bit":
        state = torch.load(Path(first.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
        saved = [s.get("__bnb_optimizer_quant_state__", s) for s in state["optimizer_states"][0]["state"].values()]
        assert any(s.get("state1", torch.zeros(0)).dtype == torch.uint8 for s in saved)
    record = run(make_cfg([*common, "trainer.max_steps=6"], name="stopped"))
    assert record["resumed_from"] and record["step"] == 6
    a, b = _weights(straight.paths.output_dir), _weights(first.paths.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
