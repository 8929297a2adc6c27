"""What lmlab puts in a Lightning checkpoint besides weights, and reading it back.

Checkpoints are self-contained: the model config, the PEFT method and the tokenizer's files
travel inside (`checkpoint["lmlab"]`), so `init_from=<ckpt>` rebuilds the exact backbone and
vocabulary without the original run directory. Everything in it is plain data (str, dict,
tensors), which `torch.load(weights_only=True)` reads without unpickling code.
"""

from __future__ import annotations

import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.config import RUNTIME_FIELDS
from lmlab.peft import build_peft_strategy
from lmlab.tokenizers import Tokenizer, load_tokenizer

METADATA_KEY = "lmlab"
BACKBONE_PREFIX = "backbone."


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, str]) -> Tokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(tmp)


def read_checkpoint(path: str | Path, field: str) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        return read_sharded_checkpoint(path, field)
    if not path.is_file():
        raise ConfigError(field, str(path), reason="no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only loading refuses pickled objects other than tensors and plain data: such
        # a file could run code when unpickled. lmlab never writes one.
        raise ConfigError(
            field, str(path),
            reason="refused: the file holds pickled Python objects, not only tensors and plain data "
            f"(unsafe to load; lmlab checkpoints never do) [{str(err).splitlines()[0]}]",
        ) from None
    except Exception as err:  # truncated file, not a checkpoint at all
        raise ConfigError(field, str(path), reason=f"cannot be read as a checkpoint ({err})") from None
    if METADATA_KEY not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(field, str(path), reason="not an lmlab checkpoint (no lmlab metadata)")
    return ckpt


def read_sharded_checkpoint(path: Path, field: str, weights: bool = True) -> dict[str, Any]:
    """A folder saved by trainer=fsdp or a DeepSpeed strategy, consolidated in memory (or only
    its metadata, `weights=False`)."""
    from lmlab.strategies.consolidate import consolidate, is_complete, metadata

    if not is_complete(path):
        raise ConfigError(field, str(path), reason="a folder, but not a complete FSDP2 or DeepSpeed checkpoint")
    ckpt = consolidate(path) if weights else metadata(path)
    if METADATA_KEY not in ckpt:
        raise ConfigError(field, str(path), reason="not an lmlab checkpoint (no lmlab metadata)")
    return ckpt


@dataclass
class InitSource:
    """Weights, architecture and tokenizer of an earlier run, to start a new run from."""

    path: Path
    model_config: dict[str, Any]
    peft: dict[str, Any]
    tokenizer: Tokenizer
    state_dict: dict[str, torch.Tensor]

    def load_into(self, backbone: nn.Module) -> nn.Module:
        """Copy the weights in. A source trained with adapters is loaded as such, then merged."""
        source_strategy = build_peft_strategy(self.peft)
        if source_strategy.can_merge:
            source_strategy.apply(backbone)
        missing, unexpected = backbone.load_state_dict(self.state_dict, strict=False)
        if unexpected and not source_strategy.can_merge and not missing:
            method = source_strategy.method
            raise ConfigError(
                "init_from", str(self.path),
                reason=f"the checkpoint was trained with peft={method}, which cannot be merged into "
                f"its backbone ({source_strategy.cannot_merge_reason}); start from its base and load "
                f"the trained tensors with peft_from=<dir> (written by `lmlab export {self.path} "
                "<dir> --adapter-only`)",
            )
        if missing or unexpected:
            raise ConfigError(
                "init_from", str(self.path),
                reason=f"weights do not fit the backbone (missing {missing[:5]}, unexpected {unexpected[:5]})",
            )
        return source_strategy.merge(backbone)


def load_hf_init_source(directory: str) -> InitSource:
    """`init_from=hf:<dir>`: weights, architecture and tokenizer of a local HF checkpoint."""
    from lmlab.models.hf import hf_model_config, import_hf, tokenizer_path
    from lmlab.tokenizers import HFTokenizer, TokenizerConfig

    hf_model_config(directory)  # directory and architecture errors come first
    if tokenizer_path(directory) is None:
        raise ConfigError("init_from", f"hf:{directory}",
                          reason="no tokenizer.json next to the model (its ids must match the embeddings)")
    tokenizer = HFTokenizer.train(TokenizerConfig(kind="hf", path=directory), [])
    config, state = import_hf(directory, id_offset=tokenizer.id_offset, vocab_size=tokenizer.vocab_size)
    return InitSource(path=Path(directory), model_config=config.to_dict(), peft={"method": "none"},
                      tokenizer=tokenizer, state_dict=state)


def load_init_source(path: str | Path) -> InitSource:
    if str(path).startswith("hf:"):
        return load_hf_init_source(str(path)[3:])
    ckpt = read_checkpoint(path, "init_from")
    meta = ckpt[METADATA_KEY]
    state = {
        k[len(BACKBONE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(BACKBONE_PREFIX)
    }
    return InitSource(
        path=Path(path),
        model_config=meta["model"],
        peft=meta.get("peft", {"method": "none"}),
        tokenizer=tokenizer_from_files(meta["tokenizer_files"]),
        state_dict=state,
    )


# Settings a resumed run may change: they alter no tensor shape and no id's meaning.
RESUME_MAY_CHANGE = {*RUNTIME_FIELDS, "vocab_size", "hf_id_offset"}


@dataclass
class ResumeSource:
    """What a checkpoint fixes for the run that resumes from it."""

    path: Path
    tokenizer: Tokenizer
    model_config: dict[str, Any]
    peft: dict[str, Any]

    def check_matches(self, model: dict[str, Any], peft: dict[str, Any], tokenizer: dict[str, Any]) -> None:
        """Resuming with another architecture, PEFT method or tokenizer cannot work: say which
        field differs before Lightning fails deep inside load_state_dict."""
        where = f"the checkpoint {self.path}"
        for key, saved in self.model_config.items():
            if key not in RESUME_MAY_CHANGE and model.get(key) != saved:
                raise ConfigError(f"model.{key}", model.get(key), [saved],
                                  f"{where} was trained with model.{key}={saved!r}; resume with the same "
                                  "architecture, or start a new run directory")
        if peft != self.peft:
            keys = ["method", *sorted((set(peft) | set(self.peft)) - {"method"})]
            diff = next(k for k in keys if peft.get(k) != self.peft.get(k))
            raise ConfigError(f"peft.{diff}", peft.get(diff), [self.peft.get(diff)],
                              f"{where} was trained with peft={self.peft.get('method')}")
        saved_tok = self.tokenizer.config.to_dict()
        for key, value in tokenizer.items():
            if key in saved_tok and saved_tok[key] != value:
                raise ConfigError(f"tokenizer.{key}", value, [saved_tok[key]],
                                  f"{where} was trained with another tokenizer (its ids would change meaning)")


def load_resume_source(path: str | Path) -> ResumeSource:
    # A sharded folder: only its metadata is needed here (the strategy loads the shards itself).
    ckpt = read_sharded_checkpoint(Path(path), "ckpt_path", weights=False) if Path(path).is_dir() \
        else read_checkpoint(path, "ckpt_path")
    meta = ckpt[METADATA_KEY]
    return ResumeSource(
        path=Path(path),
        tokenizer=tokenizer_from_files(meta["tokenizer_files"]),
        model_config=meta.get("model", {}),
        peft=meta.get("peft", {"method": "none"}),
    )
