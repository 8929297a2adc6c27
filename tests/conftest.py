"""Shared fixtures: compose configs from conf/ the way `python train.py` does, shrunk for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
SMS_SPAM = SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv"

# A tiny version of every run: small backbone, few examples, a few steps of everything.
TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64"]
TINY_SYNTHETIC = ["data.n_train=64", "data.n_val=8", "data.n_test=8", "data.batch_size=8", "data.eval_batch_size=16"]
TINY_TEXT = [
    "data.seq_len=32", "data.batch_size=4", "data.max_eval_windows=8",
    "data.tokenizer_train_chars=100000",
]


def _data_option(overrides: list[str]) -> str:
    """The data option a run will use: named directly, or chosen by its experiment."""
    data = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), None)
    if data:
        return data
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    if experiment:
        spec = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")
        for entry in spec.get("defaults", []):
            if isinstance(entry, DictConfig) and "override /data" in entry:
                return entry["override /data"]
    return "synthetic"


TINY_CLASSIFICATION = [
    f"data.path={SMS_SPAM}", "data.has_header=false", "data.batch_size=8", "data.eval_batch_size=16",
    "data.max_length=32",
]
TINY_PARALLEL = ["data.batch_size=8", "data.eval_batch_size=16", "data.max_length=32"]
TINY_DATA = {"text": TINY_TEXT, "classification": TINY_CLASSIFICATION, "parallel": TINY_PARALLEL}


def tiny_overrides(overrides: list[str]) -> list[str]:
    data = _data_option(overrides)
    base = ["debug=fast", *TINY_MODEL, *TINY_DATA.get(data, TINY_SYNTHETIC)]
    if any(o == "data=text" for o in overrides):
        base.append(f"data.path={SHAKESPEARE}")
    return base + list(overrides)


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path, tiny: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=tiny_overrides(overrides) if tiny else list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.paths.data_dir = str(SHARED_DATA)
        cfg.print_config = False
        cfg.overrides = list(overrides)
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session, as a user's machine would have."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    def make(overrides: list[str] = (), name: str = "run", tiny: bool = True) -> DictConfig:
        return compose_config(list(overrides), tmp_path / name, cache_dir, tiny=tiny)

    return make


@pytest.fixture(autouse=True)
def _no_wandb_account(monkeypatch, tmp_path):
    """Tests never use a W&B account or the network."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_lmlab_checkpoint(path: Path, backbone, tokenizer) -> Path:
    """A checkpoint as a run writes it (weights, model config, tokenizer files), without a run:
    usable as `init_from=` or `teacher=`."""
    import torch

    from lmlab.checkpoint import METADATA_KEY, tokenizer_files

    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                METADATA_KEY: {"model": backbone.config.to_dict(), "peft": {"method": "none"},
                               "tokenizer_files": tokenizer_files(tokenizer)}}, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """An untrained tiny decoder with a word tokenizer of the synthetic tasks, as `teacher=`."""
    import torch

    from lmlab.data import SyntheticTasksDataModule
    from lmlab.models import ModelConfig, build_backbone

    directory = tmp_path_factory.mktemp("teacher")
    dm = SyntheticTasksDataModule(n_train=64, n_val=8, n_test=8, tokenizer={"kind": "word"},
                                  cache_dir=directory / "cache")
    dm.setup()
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(vocab_size=dm.tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                          max_seq_len=64))
    return write_lmlab_checkpoint(directory / "teacher.ckpt", backbone, dm.tokenizer)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A local Hugging Face directory (tiny random Llama + a word-level tokenizer.json covering
    the synthetic tasks), as `model=hf` / `init_from=hf:` expect; nothing is downloaded."""
    import torch
    import transformers

    from tests.models.hf.conftest import write_word_tokenizer

    directory = tmp_path_factory.mktemp("tiny_llama")
    words = ["<unk>", "</s>", "sort", "ascending", "descending", "add", "reverse", ":"] + [str(i) for i in range(110)]
    write_word_tokenizer(directory, words, {"unk_token": "<unk>", "eos_token": "</s>"})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1,
    )).save_pretrained(str(directory))
    return directory
