"""`lmlab describe`, `lmlab report` and `lmlab export --adapter-only` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab import ConfigError
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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "adapter"])
def test_export_adapter_only_then_peft_from_reproduces_the_run(method, make_cfg, tmp_path, capsys):
    """Base run -> PEFT run from it -> `lmlab export --adapter-only` -> `init_from=<base>
    peft_from=<dir>` rebuilds the trained model exactly, from a file a fraction of the checkpoint."""
    import torch

    from lmlab.assemble import build_parts
    from lmlab.train import run

    base_cfg = make_cfg(["model=gqa"], name="base")
    run(base_cfg)
    base = Path(base_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = make_cfg(["model=gqa", f"init_from={base}", f"peft={method}"], name=method)
    record = run(cfg)
    if method == "qlora":
        report = record["peft_report"]
        assert report["quantized_linear_bytes_after"] < report["quantized_linear_bytes_before"] / 3
        assert report["frozen_base_bytes_after"] < report["frozen_base_bytes_before"]
    else:
        assert record["peft_report"] == {"adapters": 4}
    run_dir = Path(cfg.paths.output_dir)

    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), str(out), "--adapter-only"]) == 0
    assert "peft_from=" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_init_from"] == str(base) and config["peft"]["method"] == method
    assert config["bytes"] < config["checkpoint_bytes"] / 3

    trained = build_parts(cfg).task.eval()
    trained.load_state_dict(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    # peft is left at its default: the adapter's method and fields are used.
    loaded = build_parts(make_cfg(["model=gqa", f"init_from={base}", f"peft_from={out}"], name="load")).task.eval()
    x = torch.randint(6, 40, (2, 9))
    assert torch.equal(loaded.backbone(x), trained.backbone(x))

    if method == "adapter":  # adapters cannot be merged: both ways of asking say what to do instead
        assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 2
        assert "--adapter-only" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="peft_from"):
            build_parts(make_cfg(["model=gqa", f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}"], name="x"))
    else:  # the wrong base is named, not silently used
        with pytest.raises(ConfigError, match="base differs"):
            build_parts(make_cfg(["model=gqa", f"peft_from={out}"], name="nobase"))
