"""`lmlab describe` and `lmlab report` from the command line."""

from __future__ import annotations

import json

from lmlab.cli import main
from tests.conftest import CONF_DIR


def test_describe_prints_parameters_flops_and_layers(capsys):
    assert main(["describe", "model=gqa", "model.n_layers=3", "--config-dir", str(CONF_DIR)]) == 0
    out = capsys.readouterr().out
    for words in ("parameters", "FLOPs per token", "KV cache per token", "layers"):
        assert words in out
    assert out.count("attention") >= 3


def test_describe_bad_config_dir(tmp_path, capsys):
    assert main(["describe", "--config-dir", str(tmp_path)]) == 2
    assert "--config-dir" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    job = tmp_path / "0"
    job.mkdir()
    (job / "metrics.json").write_text(json.dumps({"status": "completed", "overrides": ["model=gpt"],
                                                  "metrics": {"val/loss": 1.0}}))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert "1 runs: 1 completed" in capsys.readouterr().out
