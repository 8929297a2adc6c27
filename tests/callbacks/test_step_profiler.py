"""StepProfiler writes a kernel/op table of the chosen steps of a real run."""

from __future__ import annotations

import pytest
import torch

from lmlab.callbacks import StepProfiler
from lmlab.errors import ConfigError
from tests.callbacks.test_progress import _Tiny


def test_profiles_the_chosen_steps(tmp_path):
    import lightning as L

    profiler = StepProfiler(start_step=2, steps=3, row_limit=200, dirpath=str(tmp_path))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 4)), batch_size=2)
    trainer = L.Trainer(max_steps=8, callbacks=[profiler], logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, enable_model_summary=False,
                        enable_progress_bar=False)
    trainer.fit(_Tiny(), data)
    text = (tmp_path / "step_profile.txt").read_text()
    assert text.startswith("steps 2..4: 3 step(s)")
    assert "## by host time" in text and "Self CPU time total" in text
    # The op rows themselves are not asserted: on this CPU Kineto now and then returns the
    # profiled 3 ms steps with no rows (seen twice in about ten runs, as the suite's first
    # profiler); on the H100 the tables were full.


def test_profile_of_a_run_shorter_than_start_is_not_written(tmp_path):
    import lightning as L

    profiler = StepProfiler(start_step=50, dirpath=str(tmp_path))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
    L.Trainer(max_steps=2, callbacks=[profiler], logger=False, enable_checkpointing=False,
              default_root_dir=tmp_path, enable_progress_bar=False).fit(_Tiny(), data)
    assert not (tmp_path / "step_profile.txt").exists()


@pytest.mark.parametrize("kwargs", [{"start_step": -1}, {"steps": 0}, {"row_limit": 1.5}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="callbacks.step_profiler"):
        StepProfiler(**kwargs)


def test_each_rank_keeps_its_own_profile(tmp_path):
    # Under DDP every rank profiles; rank 0's file has the plain name, the others' their rank.
    class Module:
        device = torch.device("cpu")

    for rank in (0, 1):
        trainer = type("Trainer", (), {"global_step": 0, "global_rank": rank})()
        profiler = StepProfiler(start_step=0, steps=1, dirpath=str(tmp_path))
        profiler.on_train_batch_start(trainer, Module(), None, 0)
        torch.randn(8, 8) @ torch.randn(8, 8)
        trainer.global_step = 1
        profiler.on_train_batch_end(trainer, Module(), None, None, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_profile.rank1.txt",
                                                          "step_profile.txt"]
