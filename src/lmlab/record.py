"""The run record: `metrics.json` in the run directory, written atomically at every stage.

A record exists from the moment a run starts (status "running") and is rewritten when it
completes or fails, so a sweep table can show unfinished and crashed jobs too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_FILE = "metrics.json"
VERSIONED_PACKAGES = (
    "torch", "lightning", "hydra-core", "omegaconf", "peft", "transformers", "tokenizers",
    "torchmetrics", "numpy", "wandb", "lmlab",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the code that ran, with '-dirty' when the work tree had changes."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than dropping them
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per thread too: rank zero's RankObserver may write the record while the main thread does.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(run_dir) / RECORD_FILE
    write_json_atomic(path, record)
    return path


def read_record(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RECORD_FILE).read_text())


def base_record(overrides: list[str] | None) -> dict[str, Any]:
    return {
        "status": "running",
        "metrics": {},
        "params": {},
        "tokens_seen": 0,
        "wall_time_s": 0.0,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "overrides": list(overrides or []),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
