"""Unstructured magnitude pruning: exact sparsity, the cubic schedule, masks that hold during
training, checkpoints that load into a plain backbone, and a whole run."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from lmlab import ConfigError
from lmlab.compress import Pruning, build_compression, check_compression
from lmlab.compress.gradual import GradualPruning, cubic_sparsity
from lmlab.compress.targets import compressible_linears
from lmlab.compress.unstructured import make_permanent, plain_state_dict, prune_to
from lmlab.data import SyntheticTasksDataModule
from lmlab.peft import build_peft_strategy
from lmlab.tasks import CausalLMTask
from tests.compress.conftest import tiny


def _zeros(layers) -> int:
    return sum(int((m.weight == 0).sum()) for m in layers.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_global_pruning_reaches_the_exact_sparsity(sparsity):
    backbone = tiny()
    layers = compressible_linears(backbone)
    total = sum(m.weight.numel() for m in layers.values())
    prune_to(layers, sparsity, "global")
    assert _zeros(layers) == round(sparsity * total)
    # and it is the smallest magnitudes that went: every survivor beats every pruned weight
    original = {n: m.weight_orig.detach().abs() for n, m in layers.items() if hasattr(m, "weight_orig")}
    if original:
        pruned = torch.cat([original[n][layers[n].weight_mask == 0] for n in original])
        kept = torch.cat([original[n][layers[n].weight_mask == 1] for n in original])
        assert pruned.max() <= kept.min()


def test_layer_scope_prunes_every_layer_to_the_target():
    layers = compressible_linears(tiny(ffn="swiglu"))
    prune_to(layers, 0.3, "layer")
    for module in layers.values():
        assert int((module.weight == 0).sum()) == round(0.3 * module.weight.numel())


def test_embeddings_tied_head_and_untargeted_layers_stay_dense():
    backbone = tiny(tie_embeddings=False)
    names = set(compressible_linears(backbone))
    assert "lm_head" not in names and all(".attn." in n or ".ffn." in n for n in names)
    assert "lm_head" in compressible_linears(backbone, include_lm_head=True)
    tied = tiny(tie_embeddings=True)
    assert "lm_head" not in compressible_linears(tied, include_lm_head=True)  # it is the embedding
    embed = tied.embed_tokens.weight.detach().clone()
    prune_to(compressible_linears(tied, include_lm_head=True), 0.8, "global")
    assert torch.equal(tied.embed_tokens.weight, embed)


def test_pruning_further_keeps_earlier_masks_and_permanent_weights_match():
    backbone = tiny()
    layers = compressible_linears(backbone)
    prune_to(layers, 0.3, "global")
    first = {n: m.weight_mask.clone() for n, m in layers.items()}
    prune_to(layers, 0.6, "global")
    for name, module in layers.items():
        assert not (module.weight_mask.bool() & ~first[name].bool()).any(), "a pruned weight came back"
    x = torch.randint(6, 50, (2, 10))
    masked_logits = backbone(x)
    make_permanent(backbone)
    assert not any(hasattr(m, "weight_orig") for m in backbone.modules())
    torch.testing.assert_close(backbone(x), masked_logits)
    assert _zeros(compressible_linears(backbone)) == round(0.6 * sum(m.weight.numel() for m in layers.values()))


def test_state_dict_with_masks_loads_into_a_plain_backbone():
    pruned = tiny()
    prune_to(compressible_linears(pruned), 0.5, "layer")
    plain = tiny(seed=1)
    plain.load_state_dict(plain_state_dict(pruned.state_dict()))
    x = torch.randint(6, 50, (2, 10))
    torch.testing.assert_close(plain(x), pruned(x))


def test_callback_state_restores_the_masks_on_a_plain_backbone():
    """What a resumed gradual run does: plain weights from the checkpoint, masks from the
    callback's state, re-attached when training starts."""
    pruned = tiny()
    callback = GradualPruning(0.5, "global", 0, 10, 2)

    class Module(torch.nn.Module):  # what the callback reads: `.backbone`
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    callback.setup(None, Module(pruned), "fit")
    prune_to(compressible_linears(pruned), 0.5, "global")
    state = callback.state_dict()
    assert state["masks"] and all(m.dtype == torch.bool for m in state["masks"].values())
    resumed = tiny(seed=1)
    resumed.load_state_dict(plain_state_dict(pruned.state_dict()))
    fresh = GradualPruning(0.5, "global", 0, 10, 2)
    fresh.load_state_dict(state)
    fresh.on_train_start(None, Module(resumed))
    layers = compressible_linears(resumed)
    for name, module in layers.items():
        assert torch.equal(module.weight_mask.bool(), state["masks"][name])
    x = torch.randint(6, 50, (2, 8))
    torch.testing.assert_close(resumed(x), pruned(x))


def test_cubic_schedule_matches_zhu_and_gupta():
    s_f, s_i, t0, t1 = 0.8, 0.1, 10, 110
    assert cubic_sparsity(5, s_f, s_i, t0, t1) == 0.0
    assert cubic_sparsity(t0, s_f, s_i, t0, t1) == pytest.approx(s_i)
    assert cubic_sparsity(60, s_f, s_i, t0, t1) == pytest.approx(s_f + (s_i - s_f) * 0.5 ** 3)
    assert cubic_sparsity(t1, s_f, s_i, t0, t1) == pytest.approx(s_f)
    assert cubic_sparsity(500, s_f, s_i, t0, t1) == pytest.approx(s_f)
    values = [cubic_sparsity(t, s_f, s_i, t0, t1) for t in range(t0, t1 + 1)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(d >= 0 for d in steps) and steps[0] > steps[-1]  # fast first, slow near the target


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    dm = SyntheticTasksDataModule(tasks=["add_1"], n_train=64, n_val=8, n_test=8, batch_size=8, eval_batch_size=8,
                                  format="clm", tokenizer={"kind": "word"}, cache_dir=tmp_path_factory.mktemp("c"))
    dm.setup()
    return dm


def test_gradual_pruning_during_training_holds_its_masks(synthetic, tmp_path):
    backbone = tiny(vocab_size=synthetic.tokenizer.vocab_size).train()
    task = CausalLMTask(backbone, synthetic.tokenizer, functools.partial(torch.optim.AdamW, lr=1e-2))
    seen: list[float] = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            layers = compressible_linears(pl_module.backbone)
            seen.append(_zeros(layers) / sum(m.weight.numel() for m in layers.values()))

    callback = GradualPruning(0.75, "global", start_step=0, end_step=6, every_n_steps=2)
    trainer = L.Trainer(max_steps=8, callbacks=[callback, Watch()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accelerator="cpu", devices=1)
    trainer.fit(task, datamodule=synthetic)
    total = sum(m.weight.numel() for m in compressible_linears(backbone).values())
    # pruned at steps 0, 2, 4 and 6 (the end): the cubic values, never undone by the optimizer
    expected = [cubic_sparsity(t, 0.75, 0.0, 0, 6) for t in range(8)]
    for step, value in enumerate(seen):
        last_pruned = max(t for t in (0, 2, 4, 6) if t <= step)
        assert value == pytest.approx(round(expected[last_pruned] * total) / total, abs=1e-9), step
    assert not any(hasattr(m, "weight_orig") for m in backbone.modules()), "masks were not made permanent"
    assert _zeros(compressible_linears(backbone)) == round(0.75 * total)
    # a checkpoint taken with masks attached holds plain weights and the masks
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert not any(k.endswith(("_orig", "_mask")) for k in ckpt["state_dict"])


def test_default_schedule_reaches_the_target_on_the_last_step(synthetic):
    backbone = tiny(vocab_size=synthetic.tokenizer.vocab_size).train()
    task = CausalLMTask(backbone, synthetic.tokenizer, functools.partial(torch.optim.AdamW, lr=1e-2))
    reached: list[int] = []

    class Watch(L.Callback):  # runs after GradualPruning's batch-start hook, before the step
        def on_train_batch_start(self, trainer, pl_module, *args):
            reached.append(_zeros(compressible_linears(pl_module.backbone)))

    trainer = L.Trainer(max_steps=5, callbacks=[GradualPruning(0.5, "layer", 0, None, 2), Watch()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(task, datamodule=synthetic)
    layers = compressible_linears(backbone)
    assert reached[-1] == sum(round(0.5 * m.weight.numel()) for m in layers.values())  # step 4 trains pruned
    assert reached == sorted(reached)


def test_config_mistakes_are_config_errors():
    for cfg, field in [
        ({"method": "prune", "sparsity": 1.0}, "compress.sparsity"),
        ({"method": "prune", "sparsity": -0.1}, "compress.sparsity"),
        ({"method": "prune", "scope": "row"}, "compress.scope"),
        ({"method": "prune", "schedule": "gradual", "kind": "structured"}, "compress.schedule"),
        ({"method": "prune", "schedule": "gradual", "initial_sparsity": 0.6, "sparsity": 0.5},
         "compress.initial_sparsity"),
        ({"method": "prune", "every_n_steps": 0}, "compress.every_n_steps"),
        ({"method": "prune", "finetune_steps": -1}, "compress.finetune_steps"),
        ({"method": "prune", "rate": 0.5}, "compress.rate"),
        ({"method": "zip"}, "compress.method"),
    ]:
        with pytest.raises(ConfigError) as info:
            build_compression(cfg)
        assert info.value.field == field
    parts = SimpleNamespace(task=SimpleNamespace(backbone=tiny()), strategy=build_peft_strategy({"method": "none"}))
    with pytest.raises(ConfigError, match="one device"):
        check_compression(Pruning(), parts, OmegaConf.create({"devices": 2, "strategy": {"_target_": "ddp"}}))
    check_compression(Pruning(), parts, OmegaConf.create({"devices": 1}))
    gradual = Pruning(schedule="gradual", end_step=100)
    with pytest.raises(ConfigError, match="trainer.max_steps=50"):
        gradual.check(tiny(), max_steps=50)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["compress.finetune_steps=2"],
                                   ["compress.schedule=gradual", "compress.every_n_steps=1", "compress.scope=layer"]])
def test_prune_run_records_sparsity_and_metrics(make_cfg, extra):
    from lmlab.train import run

    record = run(make_cfg(["compress=prune", "compress.sparsity=0.6", *extra]))
    section = record["compress"]
    assert section["sparsity_after"] == pytest.approx(0.6, abs=1e-3)
    assert section["params_after"] == section["params_before"]
    assert section["metrics_before"]["val/loss"] > 0 and section["metrics_after"]["val/loss"] > 0
    assert record["metrics"]["compressed/val/loss"] == section["metrics_after"]["val/loss"]
    # the pruned weights as a checkpoint init_from takes
    from lmlab.checkpoint import load_init_source

    source = load_init_source(section["checkpoint"])
    weights = [v for k, v in source.state_dict.items() if k.startswith("layers.") and k.endswith("proj.weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=1e-3)
    if "compress.finetune_steps=2" in extra:
        assert section["metrics_after_finetune"]["val/loss"] > 0
        assert "finetuned/val/loss" in record["metrics"]
