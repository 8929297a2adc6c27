"""`lmlab tokenizers`: the tokenizer lab from the command line."""

from __future__ import annotations

import csv

import pytest

from lmlab.cli import main
from tests.conftest import SHARED_DATA

FLORES_DEV = SHARED_DATA / "flores200_sample" / "dev"


@pytest.fixture
def parallel_texts(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for lang in ("eng_Latn", "fra_Latn", "hin_Deva"):
        lines = (FLORES_DEV / f"{lang}.dev").read_text(encoding="utf-8").splitlines()
        (folder / f"{lang}.dev").write_text("\n".join(lines[:60]) + "\n", encoding="utf-8")
    return folder


def test_compares_tokenizers_on_parallel_texts(parallel_texts, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "tokenizers",
            str(parallel_texts),
            "-t",
            "byte",
            "-t",
            "unigram vocab_size=700",
            "-t",
            "char",
            "--set",
            "lowercase=true",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "| tokenizer | vocab | tokens/word |" in printed
    assert "Token premium relative to eng_Latn" in printed  # chosen automatically
    assert "| unigram vocab_size=700 |" in printed and "| hin_Deva |" in printed
    assert (out / "tokenizers.md").read_text(encoding="utf-8") in printed
    with (out / "tokenizers.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 4
    eng = next(r for r in rows if r["tokenizer"] == "byte" and r["text"] == "eng_Latn")
    assert float(eng["premium"]) == 1.0 and float(eng["roundtrip_rate"]) < 1.0  # lowercased
    assert (out / "tokenizers.png").stat().st_size > 1000


def test_any_local_text_without_a_reference(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("some local text\nwith two lines 12345\n", encoding="utf-8")
    code = main(["tokenizers", str(text), "-t", "byte", "--out", str(tmp_path / "o")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| byte | 262 |" in printed and "premium" not in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.txt", "-t", "byte"], "no such file or folder"),
        (["{texts}", "-t", "bpf"], "no such tokenizer option"),
        (["{texts}", "-t", "bpe vocab_size=3"], "tokenizer.vocab_size=3"),
        (["{texts}", "-t", "byte", "--reference", "deu_Latn"], "no text set has this name"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, parallel_texts, tmp_path, capsys):
    args = [a.replace("{texts}", str(parallel_texts)) for a in args]
    assert main(["tokenizers", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
