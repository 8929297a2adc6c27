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
