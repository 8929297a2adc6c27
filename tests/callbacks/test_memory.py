"""Memory numbers in the run record: parameter, gradient and optimizer-state bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.callbacks.memory import optimizer_state_bytes, parameter_bytes
from lmlab.train import run


def _stepped(optimizer_cls, module, **kw):
    opt = optimizer_cls(module.parameters(), **kw)
    module(torch.randn(2, module.in_features)).sum().backward()
    opt.step()
    return opt


def test_adamw_state_is_two_fp32_moments_and_a_step_counter_per_tensor():
    layer = nn.Linear(64, 32)
    opt = _stepped(torch.optim.AdamW, layer)
    assert parameter_bytes(layer.parameters()) == (64 * 32 + 32) * 4
    assert optimizer_state_bytes(opt) == 2 * (64 * 32 + 32) * 4 + 2 * 4  # step: a float32 scalar each


def test_adamw8bit_state_is_bytes_plus_quantisation_maps_and_block_maxima():
    layer = nn.Linear(256, 64, bias=False)  # 16,384 weights: quantised (>= min_8bit_size)
    bnb = pytest.importorskip("bitsandbytes")  # absent from the lent GPU machines' image
    opt = _stepped(bnb.optim.AdamW8bit, layer)
    n = 256 * 64
    # two uint8 moments, two 256-entry fp32 code maps, one fp32 max per 256-element block each
    assert optimizer_state_bytes(opt) == 2 * n + 2 * 256 * 4 + 2 * (n // 256) * 4
    assert optimizer_state_bytes(opt) * 3.5 < optimizer_state_bytes(_stepped(torch.optim.AdamW, layer))


def test_adafactor_state_is_factored():
    layer = nn.Linear(256, 64, bias=False)
    opt = _stepped(torch.optim.Adafactor, layer)
    assert optimizer_state_bytes(opt) == (64 + 256) * 4 + 4  # row and column factors + step


# -- in the run record ------------------------------------------------------------------------------
def _memory(make_cfg, name, *overrides):
    record = run(make_cfg(["trainer.max_steps=2", "trainer.val_check_interval=2", *overrides], name=name))
    assert record["status"] == "completed"
    return record


@pytest.mark.slow
def test_record_has_memory_of_full_lora_and_8bit_runs(make_cfg):
    wide = ["model.d_model=128", "model.n_layers=1"]  # matrices well above min_8bit_size
    full = _memory(make_cfg, "full", *wide)
    mem, params = full["memory"], full["params"]
    assert mem["param_bytes"] == 4 * params["total"] and mem["trainable_param_bytes"] == 4 * params["trainable"]
    assert mem["grad_bytes"] == mem["trainable_param_bytes"]
    counters = mem["optimizer_state_bytes"] - 2 * mem["trainable_param_bytes"]
    assert 0 < counters < 4 * 100 and counters % 4 == 0  # one float32 step per parameter tensor

    lora = _memory(make_cfg, "lora", *wide, "peft=lora")["memory"]
    assert lora["param_bytes"] > mem["param_bytes"]  # the adapters are added
    assert lora["grad_bytes"] == lora["trainable_param_bytes"]
    assert lora["optimizer_state_bytes"] * 10 < mem["optimizer_state_bytes"]

    eight_bit = _memory(make_cfg, "adamw8bit", *wide, "optimizer=adamw8bit")["memory"]
    assert eight_bit["param_bytes"] == mem["param_bytes"]
    assert 3.0 < mem["optimizer_state_bytes"] / eight_bit["optimizer_state_bytes"] < 4.0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "moe"])
def test_activation_checkpointing_trains_identically(make_cfg, model):
    """Same losses and the same parameter/gradient/state bytes: only activations are traded."""
    common = [f"model={model}", "model.dropout=0.1", "trainer.max_steps=3", "trainer.val_check_interval=3"]
    plain = run(make_cfg(common, name="plain"))
    checkpointed = run(make_cfg([*common, "model.activation_checkpointing=true"], name="checkpointed"))
    assert checkpointed["model_config"]["activation_checkpointing"] is True
    for key in ("train/loss", "val/loss", "test/loss"):
        assert checkpointed["metrics"][key] == plain["metrics"][key], key
    assert checkpointed["memory"] == plain["memory"]


def test_report_shows_memory_columns(tmp_path):
    import json

    from lmlab.report import build_table, find_records

    for num, (optimizer, state) in enumerate((("adamw", 800), ("adamw8bit", 220))):
        job = tmp_path / str(num)
        job.mkdir()
        memory = {"param_bytes": 400, "trainable_param_bytes": 400, "grad_bytes": 400, "optimizer_state_bytes": state}
        (job / "metrics.json").write_text(json.dumps({
            "status": "completed", "overrides": [f"optimizer={optimizer}"], "memory": memory}))
    (tmp_path / "2").mkdir()  # a run from before memory was recorded
    (tmp_path / "2" / "metrics.json").write_text(json.dumps({"status": "failed", "overrides": ["optimizer=sgd"]}))
    columns, rows, _, _ = build_table(find_records(tmp_path), tmp_path)
    assert {"param_bytes", "grad_bytes", "optimizer_state_bytes"} <= set(columns)
    assert "cuda_peak_allocated_bytes" not in columns  # no run measured it
    assert [r["optimizer_state_bytes"] for r in rows] == [800, 220, ""]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_is_each_runs_own_in_one_process():
    # A sweep's runs share one process: a small run after a large one reports its own peak.
    import lightning as L

    from lmlab.callbacks.memory import MemoryMonitor

    class Net(L.LightningModule):
        def __init__(self, width):
            super().__init__()
            self.layer = torch.nn.Linear(width, width)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    peaks = []
    for width in (4096, 64):
        monitor = MemoryMonitor()
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, width)),
                                           batch_size=4)
        L.Trainer(max_steps=2, accelerator="gpu", devices=1, callbacks=[monitor], logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(Net(width), data)
        peaks.append(monitor.memory["cuda_peak_allocated_bytes"])
    assert peaks[1] < peaks[0] / 2  # without the reset: the first run's peak again
