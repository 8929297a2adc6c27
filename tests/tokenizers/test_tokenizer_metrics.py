"""Tokenizer metrics on hand-computable examples, and the lab's comparison and outputs."""

from __future__ import annotations

import csv
import math

import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import METRIC_NAMES, build_tokenizer, tokenizer_metrics
from lmlab.tokenizers.lab import compare, parse_spec, read_text_sets, training_texts
from lmlab.tokenizers.lab_output import plot, report_markdown, write_csv
from lmlab.tokenizers.metrics import count_text
from tests.tokenizers.conftest import FLORES_DEV


def test_metrics_of_a_char_tokenizer_by_hand():
    tok = build_tokenizer({"kind": "char"}, ["ab ab c"])  # alphabet: " ", a, b, c
    m = tokenizer_metrics(tok, ["ab ab", "c d"])
    # 8 characters -> 8 tokens ("d" is <unk>); 4 whitespace words: ab, ab, c, d.
    assert m["vocab_size"] == 10
    assert m["tokens"] == 8
    assert m["fertility"] == 8 / 4
    assert m["tokens_per_char"] == 1.0
    assert m["bytes_per_token"] == 1.0
    assert m["split_word_rate"] == 2 / 4  # "ab" twice takes 2 tokens, "c" and "d" one
    assert m["unk_rate"] == 1 / 8
    assert m["vocab_utilisation"] == 4 / 4  # " ", a, b, c all used
    assert m["roundtrip_rate"] == 1 / 2  # "c d" comes back as "c " (<unk> dropped)
    assert m["encode_mb_per_s"] > 0
    assert set(m) == set(METRIC_NAMES)


def test_metrics_of_a_word_tokenizer_by_hand():
    tok = build_tokenizer({"kind": "word"}, ["the cat sat, the end"])  # the cat sat , end
    m = tokenizer_metrics(tok, ["the cat sat.", "a dog"])
    # Tokens: the cat sat <unk>(".") | <unk>(a) <unk>(dog); words: the cat "sat." | a dog.
    assert m["vocab_size"] == 6 + 5
    assert m["tokens"] == 6 and m["fertility"] == 6 / 5
    assert m["bytes_per_token"] == (12 + 5) / 6
    assert m["split_word_rate"] == 1 / 5  # only "sat." takes two tokens
    assert m["unk_rate"] == 3 / 6
    assert m["vocab_utilisation"] == 3 / 5  # the, cat, sat of the 5 learned words
    assert m["roundtrip_rate"] == 0.0


def test_utf8_bytes_and_pooling_add_up():
    tok = build_tokenizer({"kind": "byte"})
    a, b = count_text(tok, ["héllo wörld"]), count_text(tok, ["日本語"])
    assert a.bytes == a.tokens == 13 and b.bytes == b.tokens == 9
    pooled = (a + b).metrics()
    assert pooled["tokens"] == 22 and pooled["bytes_per_token"] == 1.0
    assert pooled["fertility"] == 22 / 3 and pooled["roundtrip_rate"] == 1.0
    assert math.isnan(count_text(tok, []).metrics()["fertility"])


def test_parse_spec_reads_the_conf_option_and_overrides():
    spec = parse_spec("bpe vocab_size=300 digits=split", ["tokenizer.lowercase=true"])
    assert spec.label == "bpe vocab_size=300 digits=split"
    c = spec.config
    assert (c.kind, c.vocab_size, c.digits, c.lowercase, c.min_frequency) == (
        "bpe",
        300,
        "split",
        True,
        2,  # min_frequency from conf/tokenizer/bpe.yaml
    )
    with pytest.raises(ConfigError, match="no such tokenizer option"):
        parse_spec("bpf")
    with pytest.raises(ConfigError, match="tokenizer.vocab"):
        parse_spec("bpe vocab=3")
    with pytest.raises(ConfigError, match="key=value"):
        parse_spec("bpe 300")


def test_read_text_sets_names_flores_files_by_language(tmp_path):
    sets = read_text_sets([FLORES_DEV])
    assert len(sets) == 18 and sets[0].name == "arb_Arab" and len(sets[0].texts) == 997
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_text_sets([tmp_path / "empty.txt"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text_sets([tmp_path / "latin1.txt"])
    with pytest.raises(DataError, match="no such file"):
        read_text_sets([tmp_path / "missing"])


def test_training_texts_share_the_budget_between_sets():
    sets = read_text_sets([FLORES_DEV / "eng_Latn.dev", FLORES_DEV / "zho_Hans.dev"])
    texts = training_texts(sets, 2000)
    eng = sum(len(t) for t in texts if t in sets[0].texts)
    zho = sum(len(t) for t in texts if t in sets[1].texts)
    assert 1000 <= eng < 1400 and 1000 <= zho < 1400


@pytest.fixture(scope="module")
def small_flores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flores")
    for lang in ("eng_Latn", "deu_Latn", "zho_Hans"):
        lines = (FLORES_DEV / f"{lang}.dev").read_text(encoding="utf-8").splitlines()
        (folder / f"{lang}.dev").write_text("\n".join(lines[:80]) + "\n", encoding="utf-8")
    return folder


def test_compare_gives_premium_relative_to_the_reference(small_flores, tmp_path):
    specs = [parse_spec("byte"), parse_spec("bpe vocab_size=1500")]
    rows = compare(specs, read_text_sets([small_flores]), reference="eng_Latn", cache_dir=tmp_path)
    assert len(rows) == 2 * (3 + 1)
    by = {(r["tokenizer"], r["text"]): r for r in rows}
    assert by[("byte", "eng_Latn")]["premium"] == 1.0
    # Byte premium is the UTF-8 size ratio of the parallel texts: Chinese takes 3 bytes a char.
    eng, zho = (by[("byte", t)]["tokens"] for t in ("eng_Latn", "zho_Hans"))
    assert by[("byte", "zho_Hans")]["premium"] == zho / eng
    assert by[("byte", "all")]["tokens"] == sum(
        by[("byte", t)]["tokens"] for t in ("eng_Latn", "deu_Latn", "zho_Hans")
    )
    assert "premium" not in by[("byte", "all")]
    with pytest.raises(ConfigError, match="reference"):
        compare(specs, read_text_sets([small_flores]), reference="fra_Latn")

    markdown = report_markdown(rows, "eng_Latn")
    assert "| tokenizer | vocab | tokens/word |" in markdown
    assert "Token premium relative to eng_Latn" in markdown
    assert "| zho_Hans |" in markdown
    path = write_csv(rows, tmp_path / "t.csv")
    with path.open(encoding="utf-8") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == 8 and "premium" in read[0] and float(read[0]["fertility"]) > 0
    png = plot(rows, tmp_path / "t.png", "eng_Latn")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
