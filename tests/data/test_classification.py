"""Classification data: real TSVs with their quirks, stratified splits, errors with file:line."""

from __future__ import annotations

import pytest

from lmlab import ConfigError, DataError
from lmlab.data import ClassificationDataModule
from lmlab.data.splits import stratified_split
from lmlab.data.tables import read_labelled_texts
from tests.conftest import SHARED_DATA

SST2 = SHARED_DATA / "sst2"
SMS = SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv"


def _labels(rows):
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    return counts


def test_sst2_rows_match_its_source_counts():
    # (the folder as a data module, with its three split files: tests/tasks/test_classify.py)
    # train.tsv has CRLF line ends: no label or text may keep a "\r"
    train = read_labelled_texts(SST2 / "train.tsv", 1, 0)
    assert _labels(train) == {"0": 29780, "1": 37569}
    assert train[0].text == "hide new secretions from the parental units" and train[0].line == 2
    assert not any("\r" in r.text or "\r" in r.label for r in train)
    assert _labels(read_labelled_texts(SST2 / "dev.tsv", 1, 0)) == {"0": 428, "1": 444}
    assert _labels(read_labelled_texts(SST2 / "test.tsv", "content", "label")) == {"0": 912, "1": 909}


def test_sms_spam_without_header_or_final_newline():
    rows = read_labelled_texts(SMS, 1, 0, has_header=False)
    assert _labels(rows) == {"ham": 4827, "spam": 747}
    assert rows[-1].text == "Rofl. Its true to its name" and rows[-1].line == 5574


def test_one_file_is_split_stratified_and_seeded(cache_dir):
    dm = ClassificationDataModule(path=SMS, has_header=False, tokenizer={"kind": "word"}, cache_dir=cache_dir,
                                  val_fraction=0.1, test_fraction=0.1, seed=3)
    dm.setup()
    assert dm.label_names == ["ham", "spam"] and dm.task_kwargs() == {"num_classes": 2}
    total = [4827, 747]
    sizes = {split: len(dm.encoded[split]) for split in ("train", "val", "test")}
    assert sum(sizes.values()) == 5574
    for split in ("train", "val", "test"):
        counts = dm.class_counts(split)
        for c in range(2):  # each split keeps the corpus's class ratio within one example
            assert abs(counts[c] - sizes[split] * total[c] / 5574) <= 1
    again = ClassificationDataModule(path=SMS, has_header=False, tokenizer={"kind": "word"}, cache_dir=cache_dir,
                                     seed=3)
    again.setup()
    assert [r.line for r in again.rows["test"]] == [r.line for r in dm.rows["test"]]
    train_lines = {r.line for r in dm.rows["train"]}
    assert not train_lines & {r.line for r in dm.rows["test"]}


def test_stratified_split_fractions():
    labels = [0] * 90 + [1] * 10
    parts = stratified_split(labels, {"val": 0.2, "test": 0.1}, seed=0)
    assert sorted(i for p in parts.values() for i in p) == list(range(100))
    assert [sum(labels[i] for i in parts[s]) for s in ("val", "test", "train")] == [2, 1, 7]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bad_rows_name_file_and_line(tmp_path):
    short = _write(tmp_path, "short.tsv", "label\ttext\npos\tgood film\nneg\n")
    with pytest.raises(DataError, match="short.tsv:3") as info:
        ClassificationDataModule(path=short, tokenizer={"kind": "word"}).setup()
    assert "column" in str(info.value)
    unknown = _write(tmp_path, "unknown.csv", 'label,text\npos,"good, fine"\nmeh,whatever\n')
    with pytest.raises(DataError, match="unknown.csv:3"):
        ClassificationDataModule(path=unknown, labels=["neg", "pos"], tokenizer={"kind": "word"}).setup()
    # a dev file with a label the training file never had
    folder = tmp_path / "set"
    folder.mkdir()
    _write(folder, "train.tsv", "label\ttext\npos\tgood\nneg\tbad\n")
    _write(folder, "dev.tsv", "label\ttext\npos\tfine\nodd\tstrange\n")
    _write(folder, "test.tsv", "label\ttext\nneg\tawful\n")
    with pytest.raises(DataError, match="dev.tsv:3"):
        ClassificationDataModule(path=folder, tokenizer={"kind": "word"}).setup()


def test_csv_quoting_and_named_columns(tmp_path):
    path = _write(tmp_path, "d.csv", 'text,label\n"a, quoted text",x\nplain,y\r\nmore,x')
    rows = read_labelled_texts(path, "text", "label")
    assert [(r.text, r.label, r.line) for r in rows] == [("a, quoted text", "x", 2), ("plain", "y", 3),
                                                          ("more", "x", 4)]


@pytest.mark.parametrize(
    "kwargs,field",
    [({}, "data.path"), ({"path": "a.tsv", "train_path": "b.tsv"}, "data.train_path"),
     ({"path": "a.tsv", "val_fraction": 0.7}, "data.val_fraction"), ({"path": "a.tsv", "max_length": 2},
                                                                       "data.max_length")],
)
def test_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as info:
        ClassificationDataModule(**kwargs)
    assert info.value.field == field


def test_column_errors(tmp_path):
    path = _write(tmp_path, "d.tsv", "label\ttext\npos\tgood\n")
    with pytest.raises(ConfigError, match="data.text_column"):
        read_labelled_texts(path, "sentence", "label")
    with pytest.raises(ConfigError, match="data.text_column"):
        read_labelled_texts(path, "text", "label", has_header=False)
    with pytest.raises(ConfigError, match="data.delimiter"):
        read_labelled_texts(_write(tmp_path, "d.data", "a b\n"), 1, 0)
