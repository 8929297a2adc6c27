"""The tokenizer lab: several tokenizer configs x several text sets -> one row of metrics each.

    specs = [parse_spec("bpe vocab_size=8000"), parse_spec("bytelevel_bpe")]
    sets = read_text_sets(["../shared/data/flores200_sample/devtest"])   # one set per language
    train = read_text_sets(["../shared/data/flores200_sample/dev"])
    rows = compare(specs, sets, train, reference="eng_Latn")

A spec names a `conf/tokenizer/<option>.yaml` (or a bare kind) plus `key=value` overrides, as
`tokenizer=<option> tokenizer.<key>=<value>` would on the training command line. Each trained
tokenizer is built once on the training sets (an equal share of `train_chars` per set, so a
multilingual vocabulary is not dominated by the largest file) and cached like a run's.

With a reference set (parallel texts, e.g. English in FLORES), each row also gets `premium`:
its token count over the reference's, for the same tokenizer (Petrov et al., 2023).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers.build import build_tokenizer
from lmlab.tokenizers.config import TOKENIZER_KINDS, TokenizerConfig
from lmlab.tokenizers.metrics import TextCounts, count_text

CONF_DIR = Path(__file__).resolve().parents[3] / "conf" / "tokenizer"
ALL_TEXTS = "all"


@dataclass(frozen=True)
class TokenizerSpec:
    label: str
    config: TokenizerConfig


@dataclass(frozen=True)
class TextSet:
    name: str
    texts: list[str]


def default_spec_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """Every shipped tokenizer option but hf (which needs a file): what the lab compares."""
    options = sorted(p.stem for p in conf_dir.glob("*.yaml")) or list(TOKENIZER_KINDS)
    return [name for name in options if name != "hf"]


def parse_spec(spec: str, overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> TokenizerSpec:
    """ "bpe" or "bpe vocab_size=8000 digits=split": a conf option (or kind) plus overrides.

    `overrides` (e.g. a command's `--set`) apply after the spec's own; both take YAML values.
    """
    name, *own = spec.split()
    option = conf_dir / f"{name}.yaml"
    if option.is_file():
        fields = yaml.safe_load(option.read_text(encoding="utf-8")) or {}
    elif name in TOKENIZER_KINDS:
        fields = {"kind": name}
    else:
        known = sorted({*TOKENIZER_KINDS, *(p.stem for p in conf_dir.glob("*.yaml"))})
        raise ConfigError("tokenizer", name, known, "no such tokenizer option or kind")
    for item in [*own, *overrides]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("tokenizer", item, "key=value", "an override needs a value")
        fields[key.removeprefix("tokenizer.")] = yaml.safe_load(value)
    return TokenizerSpec(label=spec, config=TokenizerConfig.from_dict(fields))


def read_text_sets(paths: list[str | os.PathLike]) -> list[TextSet]:
    """One set per file; a folder gives one set per file in it, named by the file's stem.

    FLORES files `eng_Latn.devtest`, `deu_Latn.devtest`, ... become sets eng_Latn, deu_Latn.
    Each non-empty line is one text. Plain UTF-8 or gzip (`.gz`).
    """
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(given, "folder holds no text files")
            files.extend(found)
        elif given.is_file():
            files.append(given)
        else:
            raise DataError(given, "no such file or folder")
    stems = [f.name.split(".")[0] for f in files]
    names = [
        s if stems.count(s) == 1 else f"{f.parent.name}/{f.name}" for s, f in zip(stems, files)
    ]
    return [TextSet(name, _read_lines(f)) for name, f in zip(names, files)]


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            lines = [line.rstrip("\n") for line in fh]
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (OSError, EOFError) as exc:
        raise DataError(path, f"unreadable ({exc})") from exc
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError(path, "empty: no non-blank line")
    return lines


def training_texts(sets: list[TextSet], train_chars: int) -> list[str]:
    """Lines from every set, up to an equal share of `train_chars` each."""
    share = max(1, train_chars // max(1, len(sets)))
    texts: list[str] = []
    for text_set in sets:
        used = 0
        for line in text_set.texts:
            if used >= share:
                break
            texts.append(line)
            used += len(line)
    return texts


def compare(
    specs: list[TokenizerSpec],
    sets: list[TextSet],
    train_sets: list[TextSet] | None = None,
    train_chars: int = 2_000_000,
    reference: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (tokenizer, text set), then one per tokenizer over all sets (text="all").

    Tokenizers are trained on `train_sets` (default: the evaluated sets themselves, which
    flatters them). `progress` is told each tokenizer's label before its (slow) training.
    Raises ConfigError if `reference` names no set.
    """
    names = [s.name for s in sets]
    if reference is not None and reference not in names:
        raise ConfigError("reference", reference, names, "no text set has this name")
    train = training_texts(train_sets or sets, train_chars)
    rows: list[dict[str, Any]] = []
    for spec in specs:
        if progress is not None:
            progress(spec.label)
        tokenizer = build_tokenizer(spec.config, train, cache_dir=cache_dir)
        counts = {s.name: count_text(tokenizer, s.texts) for s in sets}
        pooled = sum(
            counts.values(), start=TextCounts(tokenizer.vocab_size, tokenizer.num_special_tokens)
        )
        for name, c in [*counts.items(), (ALL_TEXTS, pooled)]:
            row = {"tokenizer": spec.label, "kind": spec.config.kind, "text": name, **c.metrics()}
            if reference is not None and name != ALL_TEXTS:
                row["premium"] = c.tokens / counts[reference].tokens
            rows.append(row)
    return rows
