"""End-to-end runs: the record, resume, init_from, errors before compute, sweeps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lmlab import ConfigError, DataError
from lmlab.checkpoint import load_init_source
from lmlab.record import read_record
from lmlab.train import build_list as _ORIGINAL_BUILD_LIST
from lmlab.train import run
from tests.conftest import ROOT, TINY_MODEL, TINY_SYNTHETIC

pytestmark = pytest.mark.slow


def test_record_has_everything(make_cfg):
    cfg = make_cfg([])
    record = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = read_record(out)
    assert on_disk["status"] == "completed"
    for key in ("val/loss", "val/ppl", "test/loss", "test/ppl", "test/acc", "val/acc"):
        assert key in on_disk["metrics"], key
    assert any(k.startswith("test/acc/") for k in on_disk["metrics"])
    assert on_disk["params"]["total"] >= on_disk["params"]["trainable"] > 0
    # 4 steps of 8 sequences, every sequence non-empty
    assert on_disk["tokens_seen"] > 4 * 8
    assert on_disk["wall_time_s"] > 0
    assert on_disk["versions"]["torch"].startswith("2.13")
    assert "git_commit" in on_disk and isinstance(on_disk["overrides"], list)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert record["best_checkpoint"] and Path(record["best_checkpoint"]).is_file()
    assert (out / "tokenizer" / "lmlab_tokenizer.json").is_file()
    assert (out / "csv" / "metrics.csv").is_file()


class StopAt(L.Callback):
    """Simulates a crash after `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class LossTrace(L.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def _run_with(cfg, extra_callbacks, monkeypatch):
    import lmlab.train as train_mod

    def build_list(node, group, **kw):
        items = _ORIGINAL_BUILD_LIST(node, group, **kw)
        return items + extra_callbacks if group == "callbacks" else items

    monkeypatch.setattr(train_mod, "build_list", build_list)
    return run(cfg)


def test_resume_reaches_the_same_losses(make_cfg, monkeypatch):
    overrides = ["trainer.max_steps=8", "trainer.val_check_interval=4",
                 "callbacks.last_checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1"]
    straight = LossTrace()
    _run_with(make_cfg(overrides, name="straight"), [straight], monkeypatch)

    cfg = make_cfg(overrides, name="crashy")
    first = LossTrace()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_with(cfg, [first, StopAt(5)], monkeypatch)
    assert read_record(cfg.paths.output_dir)["status"] == "failed"
    resumed = LossTrace()
    record = _run_with(cfg, [resumed], monkeypatch)  # same run dir: resumes from last.ckpt (step 4)
    assert record["resumed_from"].endswith("last.ckpt")
    assert record["step"] == 8
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(straight.losses[step], abs=1e-6), step
    assert record["tokens_seen"] == read_record(make_cfg(overrides, name="straight").paths.output_dir)["tokens_seen"]


def test_ckpt_path_last_requires_a_checkpoint(make_cfg):
    with pytest.raises(ConfigError, match="ckpt_path"):
        run(make_cfg(["ckpt_path=last"]))


def test_init_from_then_lora(make_cfg):
    pre = make_cfg(["model=gqa"], name="pre")
    run(pre)
    ckpt = Path(pre.paths.output_dir) / "checkpoints" / "last.ckpt"
    source = load_init_source(ckpt)

    cfg = make_cfg([f"init_from={ckpt}", "peft=lora", "data.tasks=[sort_desc]", "trainer.max_steps=2"], name="ft")
    from lmlab.assemble import build_parts

    parts = build_parts(cfg)
    backbone = parts.task.backbone
    # Architecture and tokenizer come from the checkpoint (gqa), not from the default preset (gpt).
    assert parts.model_config.n_kv_heads == 2 and parts.model_config.position == "rope"
    assert parts.datamodule.tokenizer.vocab == source.tokenizer.vocab
    base = {k.replace(".base_layer", ""): v for k, v in backbone.state_dict().items() if "lora_" not in k}
    for key, value in source.state_dict.items():
        assert torch.equal(base[key], value), key
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    record = run(cfg)
    assert record["init_from"] == str(ckpt)
    assert record["params"]["trainable"] < record["params"]["total"] / 5

    # A LoRA-trained checkpoint can itself be the start of the next run (adapters merged in).
    ft_ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    again = build_parts(make_cfg([f"init_from={ft_ckpt}", "peft=full"], name="again"))
    assert not any("lora_" in n for n, _ in again.task.backbone.named_parameters())


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.n_heads=3"], "model.n_heads"),
        (["model=gqa", "model.n_kv_heads=3"], "model.n_kv_heads"),
        (["peft=lora", "peft.target_modules=[query]"], "peft.target_modules"),
        (["model.position=learned", "data=text", "data.seq_len=128", "model.max_seq_len=64"], "data.seq_len"),
        (["model.position=spiral"], "model.position"),
        (["+model.widht=3"], "model.widht"),
        (["data.tasks=[multiply]"], "data.tasks"),
        (["+data.colour=red"], "data.colour"),
        (["+trainer.max_step=3"], "trainer.max_step"),
        (["peft=lora", "peft.r=0"], "peft.r"),
        (["task.name=translate"], "task.name"),
    ],
)
def test_config_errors_name_the_field(make_cfg, overrides, field):
    cfg = make_cfg(overrides)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.field == field
    assert field in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists(), "no record before compute"
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_task_family_mismatch_is_a_config_error(make_cfg, monkeypatch):
    import lmlab.tasks as tasks

    monkeypatch.setitem(tasks.TASKS, "mlm", (tasks.CausalLMTask, ("encoder",), ("text",)))
    with pytest.raises(ConfigError, match="task=mlm needs a backbone of family encoder"):
        run(make_cfg(["task.name=mlm"]))


def test_data_errors_name_the_file(make_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    cases = [(tmp_path / "missing.txt", "no such file"), (empty, "empty"), (latin1, "not valid UTF-8")]
    for path, words in cases:
        with pytest.raises(DataError, match=words) as info:
            run(make_cfg(["data=text", f"data.path={path}", "tokenizer=char"]))
        assert str(path) in str(info.value)
    assert "latin1.txt:2" in str(info.value)


def test_unknown_group_option_gets_hydras_message(make_cfg):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="model"):
        make_cfg(["model=transformerxl"])


def _train_py(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env_args = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path / 'outputs'}",
                "print_config=false"]
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, *env_args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_multirun_records_every_job_and_survives_a_failure(tmp_path):
    sweep = tmp_path / "sweep"
    tiny = ["debug=fast", *TINY_MODEL, *TINY_SYNTHETIC]
    proc = _train_py(["-m", *tiny, "model=gpt,mqa", "model.n_heads=4,3", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(records) == 4
    statuses = sorted(r["status"] for r in records.values())
    assert statuses == ["completed", "completed", "failed", "failed"]
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert all("model.n_heads" in r["error"] for r in failed)
    assert all(any(o.startswith("model=") for o in r["overrides"]) for r in records.values())


def test_single_run_config_error_is_one_clear_message(tmp_path):
    proc = _train_py(["debug=fast", "model.n_heads=3", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2
    assert "ConfigError: model.n_heads=3" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.position=sinusoidal"], ["model.position=rope"], ["model.position=alibi"], ["model.position=none"],
        ["model.ffn=relu", "model.norm=rmsnorm"], ["model.tie_embeddings=false", "model.dropout=0.1"],
        ["trainer.precision=bf16-mixed"], ["trainer.precision=bf16-true"],
        ["trainer.accumulate_grad_batches=2"], ["host_memory=release"],
        ["tokenizer=bpe", "tokenizer.vocab_size=200", "tokenizer.dropout=0.1"],
        ["tokenizer=bpe", "tokenizer.vocab_size=200", "tokenizer.stochastok=0.3"],
        ["model=gqa", "peft=lora", "peft.target_modules=[q_proj,v_proj,up_proj,down_proj,lm_head]"],
    ],
    ids=lambda o: " ".join(o),
)
def test_model_and_trainer_fields_train(make_cfg, overrides):
    record = run(make_cfg(overrides))
    assert record["status"] == "completed"
    assert math.isfinite(record["metrics"]["val/loss"])


def test_export_merges_lora_and_is_usable_as_init_from(make_cfg, tmp_path):
    from lmlab.assemble import build_parts
    from lmlab.cli import main as cli_main

    cfg = make_cfg(["model=gqa", "peft=lora"], name="lora")
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert cli_main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    exported = torch.load(tmp_path / "export" / "model.ckpt", weights_only=True)
    assert not any("lora_" in k for k in exported["state_dict"])
    assert (tmp_path / "export" / "tokenizer" / "lmlab_tokenizer.json").is_file()

    # The merged export computes what the trained model with its (unmerged) adapters computed.
    task = build_parts(cfg).task
    task.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    adapted = task.backbone.eval()
    assert any("lora_" in n for n, _ in adapted.named_parameters())
    merged = build_parts(make_cfg([f"init_from={tmp_path / 'export' / 'model.ckpt'}"], name="b")).task.backbone.eval()
    x = torch.randint(6, 40, (2, 9))
    torch.testing.assert_close(merged(x), adapted(x))
    assert cli_main(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 2


@pytest.mark.parametrize(
    "change,field",
    [(["model.d_model=64"], "model.d_model"), (["peft=lora"], "peft.method"),
     (["tokenizer=char"], "tokenizer.kind")],
)
def test_resuming_with_another_shape_or_tokenizer_is_a_config_error(make_cfg, change, field):
    run(make_cfg(["trainer.max_steps=2"]))
    cfg = make_cfg(["trainer.max_steps=4", *change])  # same run dir: would resume
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.field == field


def test_unwritable_output_dir(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = make_cfg([])
    cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(ConfigError, match="paths.output_dir"):
        run(cfg)
