"""Every W&B sweep in sweeps/ runs train.py with Hydra overrides, and every point of its
parameter grid composes with Hydra into a valid config (no unknown field, group option or
architecture setting)."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from lmlab.assemble import model_config_from
from lmlab.sweep import direction
from tests.conftest import ROOT, compose_config

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
METRICS = ("val/loss", "val/ppl", "val/acc", "val/bleu", "val/chrf", "val/f1", "test/loss", "test/acc")


def candidates(spec: dict) -> list:
    """The values a parameter takes: its list, its one value, or a distribution's bounds."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    assert "min" in spec and "max" in spec, f"parameter without values, value or min/max: {spec}"
    return [spec["min"], spec["max"]]


def grid(parameters: dict) -> list[dict]:
    """Every value of every parameter, each with the others at their first value (the grid's
    points differ only in such values, and composing the full product repeats the same checks)."""
    names = list(parameters)
    options = [candidates(parameters[n]) for n in names]
    base = {n: o[0] for n, o in zip(names, options)}
    points = [base] + [{**base, n: v} for n, o in zip(names, options) for v in o[1:]]
    return points


def test_there_are_sweeps_for_the_common_studies():
    names = {p.stem for p in SWEEPS}
    assert {"attention", "tokenizers", "lora_rank", "learning_rate"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_runs_train_py_with_hydra_overrides(path):
    spec = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#"), "say what the sweep studies"
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    assert spec["command"] == COMMAND
    assert spec["method"] in ("grid", "random", "bayes")
    metric = spec["metric"]
    assert metric["name"] in METRICS
    assert metric["goal"] == direction(metric["name"])  # val/acc is maximised, val/loss minimised
    assert spec["parameters"]["logger"] == {"value": "wandb"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_grid_point_composes(path, tmp_path, cache_dir):
    spec = yaml.safe_load(path.read_text())
    for i, point in enumerate(grid(spec["parameters"])):
        # The exact strings a W&B agent puts on the command line for ${args_no_hyphens}.
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args_no_hyphens"]
        cfg = compose_config(args, tmp_path / str(i), cache_dir, tiny=False)
        for key, value in point.items():
            if "." in key:  # a field, not a group option: it must exist and hold the value
                assert OmegaConf.select(cfg, key, default="<missing>") == value, f"{path.name}: {key}"
        model_config_from(cfg, None).validate()  # heads, KV heads, positions, layer patterns...


def test_grid_covers_every_value_and_bound():
    points = grid({"a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"distribution": "uniform", "min": 0, "max": 1}})
    assert points == [{"a": 1, "b": "x", "c": 0}, {"a": 2, "b": "x", "c": 0}, {"a": 1, "b": "x", "c": 1}]
