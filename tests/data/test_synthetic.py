"""The synthetic tasks: correct targets, deterministic disjoint splits, loss masked to targets."""

from __future__ import annotations

import pytest

from lmlab import ConfigError
from lmlab.data import SyntheticTasksDataModule
from lmlab.data.collate import IGNORE_INDEX
from lmlab.data.synthetic import make_splits

SIZES = {"train": 50, "val": 10, "test": 10}


def test_examples_follow_the_task():
    splits = make_splits(["sort_asc", "sort_desc", "add_1", "add_2"], 4, 1, 100, SIZES, seed=0)
    for ex in splits["train"]:
        words, nums = ex.source.split(": ")
        xs = [int(v) for v in nums.split()]
        ys = [int(v) for v in ex.target.split()]
        assert len(xs) == 4 and all(1 <= x <= 100 for x in xs)
        expected = {"sort_asc": sorted(xs), "sort_desc": sorted(xs, reverse=True),
                    "add_1": [x + 1 for x in xs], "add_2": [x + 2 for x in xs]}[ex.task]
        assert ys == expected
        assert words == {"sort_asc": "sort ascending", "sort_desc": "sort descending",
                         "add_1": "add 1", "add_2": "add 2"}[ex.task]


def test_splits_are_deterministic_disjoint_and_independent_of_other_tasks():
    a = make_splits(["add_2", "sort_asc"], 4, 1, 100, SIZES, seed=5)
    b = make_splits(["add_2", "sort_asc"], 4, 1, 100, SIZES, seed=5)
    assert a == b
    sources = {s: {(e.task, e.source) for e in a[s]} for s in a}
    assert not sources["train"] & sources["val"] and not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]
    alone = make_splits(["add_2"], 4, 1, 100, SIZES, seed=5)
    assert [e for e in a["test"] if e.task == "add_2"] == alone["test"]
    assert make_splits(["add_2"], 4, 1, 100, SIZES, seed=6) != alone


def test_batches_mask_the_loss_to_the_target(cache_dir):
    dm = SyntheticTasksDataModule(tasks=["add_2"], n_train=20, n_val=4, n_test=4, batch_size=4,
                                  tokenizer={"kind": "word"}, cache_dir=cache_dir)
    dm.setup()
    tok = dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    sep = ids.index(tok.sep_id)
    # Every label before the separator is ignored; after it come the target tokens then <eos>.
    assert all(label == IGNORE_INDEX for label in labels[:sep])
    target = [label for label in labels[sep:] if label != IGNORE_INDEX]
    assert target[-1] == tok.eos_id
    assert target[:-1] == tok.encode(batch["target_text"][0])
    # The prompt the model is asked to complete is the source followed by <sep>, left-padded.
    prompt = [i for i, m in zip(batch["prompt_ids"][0].tolist(), batch["prompt_mask"][0].tolist()) if m]
    assert prompt == [tok.bos_id, *tok.encode(dm.splits["val"][0].source), tok.sep_id]
    assert batch["prompt_mask"][:, -1].all()


@pytest.mark.parametrize(
    "kwargs,field",
    [({"tasks": ["divide"]}, "data.tasks"), ({"tasks": []}, "data.tasks"), ({"n_train": 0}, "data.n_train"),
     ({"low": 5, "high": 1}, "data.high"), ({"high": 2, "n_numbers": 1}, "data.n_train"),
     ({"batch_size": 0}, "data.batch_size")],
)
def test_bad_settings_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SyntheticTasksDataModule(**kwargs)
    assert info.value.field == field


def test_seq2seq_format_batches_are_consistent(cache_dir):
    dm = SyntheticTasksDataModule(tasks=["add_1", "sort_desc"], n_train=20, n_val=4, n_test=4, batch_size=4,
                                  format="seq2seq", tokenizer={"kind": "word"}, cache_dir=cache_dir)
    dm.setup()
    tok = dm.tokenizer
    assert dm.kind == "seq2seq"
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask", "target_text", "task", "eval_index"}
    examples = dm.splits["val"]
    for b in range(len(batch["target_text"])):
        out = batch["tgt_out"][b]
        real = out[out != IGNORE_INDEX].tolist()
        assert real[-1] == tok.eos_id
        assert tok.decode(real) == tok.decode(tok.encode(batch["target_text"][b]))
        assert real[:-1] == tok.encode(examples[b].target)
        assert batch["tgt_in"][b, : len(real)].tolist() == [tok.bos_id, *real[:-1]]
        src = batch["src_ids"][b][batch["src_mask"][b].bool()].tolist()
        assert src == [*tok.encode(examples[b].source), tok.eos_id]
        assert batch["task"][b] == examples[b].task
    assert dm.task_kwargs() == {"max_new_tokens": 5}  # four numbers and <eos>
    assert dm.max_sequence_length == max(len(s) for s, _ in dm.encoded["train"])
    train = dm.collate_train([dm.train_item(0), dm.train_item(1)])
    assert set(train) == {"src_ids", "src_mask", "tgt_in", "tgt_out", "tgt_mask"}


def test_format_auto_is_clm_and_bad_format_is_a_config_error():
    assert SyntheticTasksDataModule(format="auto").kind == "pairs"
    with pytest.raises(ConfigError, match="data.format"):
        SyntheticTasksDataModule(format="json")
