"""Masked LM: loss exactly on the chosen tokens, deterministic evaluation, a tiny BERT trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lmlab import ConfigError
from lmlab.data import TextCorpusDataModule
from lmlab.data.collate import IGNORE_INDEX
from lmlab.tasks import MaskedLMTask
from lmlab.tasks.masking import seeded_generator
from tests.conftest import SHAKESPEARE
from tests.tasks.conftest import adamw, fit, tiny_backbone


@pytest.fixture(scope="module")
def text_dm(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "a.txt"
    path.write_text(SHAKESPEARE.read_text()[:60000])
    dm = TextCorpusDataModule(path=path, seq_len=32, batch_size=8, max_eval_windows=16,
                              tokenizer={"kind": "word", "vocab_size": 400}, eval_seq_lens=[64])
    dm.setup()
    return dm


def _task(dm, **kw):
    return MaskedLMTask(tiny_backbone("encoder", dm.tokenizer.vocab_size), dm.tokenizer, adamw(), **kw)


def test_loss_covers_exactly_the_chosen_tokens(text_dm):
    task = _task(text_dm)
    batch = next(iter(text_dm.train_dataloader()))
    logits, targets = task.masked_logits(batch, seeded_generator(1))
    masked, labels = task.mask(batch, seeded_generator(1))
    assert targets.numel() == (labels != IGNORE_INDEX).sum() > 0
    # the same loss as the head over every position with non-chosen labels ignored
    full = task.backbone.mlm_logits(task.backbone(masked, batch["attention_mask"]))
    reference = F.cross_entropy(full[..., : text_dm.tokenizer.vocab_size].flatten(0, 1), labels.flatten(),
                                ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(F.cross_entropy(logits, targets), reference, rtol=1e-5, atol=1e-5)


def test_bert_mlm_trains_and_evaluates_deterministically(text_dm):
    task = _task(text_dm, seed=3)
    metrics = fit(task, text_dm, steps=6)
    for key in ("train/loss", "val/loss", "val/ppl", "val/acc", "val/loss@64", "val/acc@64",
                "test/loss", "test/acc"):
        assert key in metrics, key
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["val/loss"] > 0
    trainer = L.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=2, accelerator="cpu")
    first = trainer.validate(task, datamodule=text_dm, verbose=False)
    second = trainer.validate(task, datamodule=text_dm, verbose=False)
    assert first == second  # the same masks at every evaluation


def test_training_batches_are_masked_on_the_host_as_the_step_would(text_dm):
    # Lightning's transfer hook masks each training batch before it reaches the device; the
    # masks must be exactly those training_step draws itself (same generator), and the step
    # must use them (the loss is the one over those positions).
    task = _task(text_dm, seed=5)
    seen = []

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            masked, labels = pl_module.mask(batch, pl_module.train_generator(step, batch_idx))
            chosen = (labels != IGNORE_INDEX).flatten()
            assert batch["mlm_step"] == (step, batch_idx)
            assert torch.equal(batch["mlm_input_ids"], masked)
            assert torch.equal(batch["mlm_positions"], chosen.nonzero().squeeze(1))
            assert torch.equal(batch["mlm_targets"], labels.flatten()[chosen])
            with torch.no_grad():  # the step's own masking path, before its update
                logits, targets = pl_module.masked_logits(batch, pl_module.train_generator(step, batch_idx))
                seen.append(float(F.cross_entropy(logits, targets)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[-1] = (seen[-1], float(outputs["loss"]))

    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                        callbacks=[Check()])
    with torch.random.fork_rng():
        trainer.fit(task, datamodule=text_dm)
    assert len(seen) == 3
    for reference, trained in seen:
        assert trained == pytest.approx(reference, rel=1e-5)


def test_host_masks_are_page_locked_for_a_gpu_run(text_dm, monkeypatch):
    # Lightning moves batches with non_blocking=True: from pageable memory that copy still
    # waits, so the masks made in the transfer hook are pinned when the run is on CUDA (pinning
    # itself needs CUDA: recorded here instead).
    from types import SimpleNamespace

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    task = _task(text_dm)
    batch = next(iter(text_dm.train_dataloader()))
    for device, expected in (("cpu", 0), ("cuda", 3)):
        task._trainer = SimpleNamespace(
            training=True, global_step=4, global_rank=0, accumulate_grad_batches=1,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=-1)),
            strategy=SimpleNamespace(root_device=torch.device(device)))
        pinned.clear()
        out = task.on_before_batch_transfer(dict(batch), 0)
        assert out["mlm_step"] == (4, 0) and len(pinned) == expected
        if expected:
            assert {id(t) for t in pinned} == {id(out[k]) for k in ("mlm_input_ids", "mlm_positions", "mlm_targets")}


def test_a_batch_without_padding_runs_without_an_attention_mask(text_dm):
    # Packed windows have no padding: the step leaves the all-ones mask out, so attention runs
    # SDPA's unmasked kernels; a padded batch keeps it, and a mask already on another device
    # is kept unread (reading it would wait for that device).
    from types import SimpleNamespace

    task = _task(text_dm)
    task._trainer = SimpleNamespace(
        training=True, global_step=0, global_rank=0, accumulate_grad_batches=1, world_size=1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=-1)),
        strategy=SimpleNamespace(root_device=torch.device("cpu")))
    task.log = lambda *a, **k: None
    passed = []
    backbone_call = task.run_backbone
    rows_passed = []

    def run_backbone(ids, mask, **kwargs):
        passed.append(mask)
        rows_passed.append(kwargs.get("output_rows"))
        return backbone_call(ids, mask, **kwargs)

    task.run_backbone = run_backbone
    batch = next(iter(text_dm.train_dataloader()))
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][0, -5:] = 0

    losses = []
    for given, unpadded in ((batch, True), (padded, False)):
        out = task.on_before_batch_transfer(dict(given), 0)
        assert out["mlm_unpadded"] is unpadded
        losses.append(task.training_step(out, 0))
        assert (passed[-1] is None) if unpadded else (passed[-1] is given["attention_mask"])
        # the last layer computes the masked positions only
        assert rows_passed[-1] is out["mlm_positions"]
    # the same loss as the masked call (the masks' values changed nothing for unpadded rows)
    with torch.no_grad():
        out = task.on_before_batch_transfer(dict(batch), 0)
        reference = task.backbone.mlm_logits(task.backbone(out["mlm_input_ids"], batch["attention_mask"]))
        reference = F.cross_entropy(reference.flatten(0, 1)[out["mlm_positions"], : text_dm.tokenizer.vocab_size],
                                    out["mlm_targets"])
    torch.testing.assert_close(losses[0].detach(), reference, rtol=1e-5, atol=1e-6)

    class ElsewhereMask(torch.Tensor):
        """A mask on another device (a GPU's): reading its values would wait for that device."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func == torch.Tensor.device.__get__:
                return torch.device("meta")
            raise AssertionError(f"the hook read a mask that is not on the host ({func.__name__})")

    # evaluation batches too (masked in the step, not in the hook)
    task._trainer.training = False
    for given, unpadded in ((batch, True), (padded, False)):
        out = task.on_before_batch_transfer(dict(given), 0)
        assert out["mlm_unpadded"] is unpadded and "mlm_step" not in out
        task.validation_step(out, 0)
        assert (passed[-1] is None) if unpadded else (passed[-1] is given["attention_mask"])

    elsewhere = {**batch, "attention_mask": batch["attention_mask"].as_subclass(ElsewhereMask)}
    assert task.on_before_batch_transfer(elsewhere, 0)["mlm_unpadded"] is False


def test_evaluation_masks_do_not_depend_on_the_batching(text_dm):
    # Each row's masks follow its index in the split: 16 windows in batches of 16, of 3, or as
    # one of two ranks' shares (lmlab.data.eval_sharding) get the same masks.
    from lmlab.data.eval_sharding import eval_batches

    task = _task(text_dm)
    loader = text_dm.val_dataloader()[0]
    numbered = [loader.dataset[i] for i in range(len(loader.dataset))]  # (index, window)

    def masked(batches: list[list[int]]) -> dict[int, torch.Tensor]:
        out = {}
        for rows in batches:
            batch = loader.collate_fn([numbered[i] for i in rows])
            ids, labels = task.mask(batch, [seeded_generator(0, 1, 0, i) for i in batch["eval_index"]])
            out.update({i: torch.stack([ids[k], labels[k]]) for k, i in enumerate(rows)})
        return out

    whole = masked(eval_batches(16, 16))
    assert len(whole) == 16 and any((m[1] != IGNORE_INDEX).any() for m in whole.values())
    for batches in (eval_batches(16, 3), eval_batches(16, 3, 0, 2) + eval_batches(16, 3, 1, 2)):
        other = masked(batches)
        assert other.keys() == whole.keys()
        for i in whole:
            assert torch.equal(other[i], whole[i]), i


def test_validation_numbers_do_not_depend_on_the_eval_batch_size(text_dm):
    task = _task(text_dm, seed=3)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False)
    results = []
    for eval_batch_size in (16, 5):
        text_dm.eval_batch_size = eval_batch_size
        results.append(trainer.validate(task, datamodule=text_dm, verbose=False)[0])
    text_dm.eval_batch_size = 8
    for key in results[0]:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5), key


def test_bad_probabilities_are_config_errors(text_dm):
    with pytest.raises(ConfigError, match="task.mask_prob"):
        _task(text_dm, mask_prob=0.0)
    with pytest.raises(ConfigError, match="task.random_token_prob"):
        _task(text_dm, mask_token_prob=0.8, random_token_prob=0.3)
