"""model=hf: HFBackbone gives a local HF causal LM lmlab's decoder contract."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import ModelConfig, generate
from lmlab.models.hf_backbone import HFBackbone, lmlab_id_offset
from lmlab.peft import build_peft_strategy
from tests.models.hf.conftest import VOCAB, write_word_tokenizer


def _ids(batch=2, length=7):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_forward_and_hidden_match_the_hf_model(hf_model, name):
    hf, directory = hf_model(name)
    backbone = HFBackbone(ModelConfig(), path=directory).eval()
    assert backbone.config.vocab_size == VOCAB and backbone.id_offset == 0
    ids = _ids()
    with torch.no_grad():
        assert (backbone(ids) - hf(ids).logits).abs().max() <= 1e-5
        hidden = backbone.hidden(ids)
        assert hidden.shape == (2, 7, 32)
        logits = hf.get_output_embeddings()(hidden)
        assert (logits - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_steps_let_transformers_cache_and_evaluation_does_not(hf_model, name):
    # use_cache=False without a cache makes transformers read the positions to the host in
    # every training forward (a GPU sync); a cache in evaluation would only keep every layer's
    # keys/values alive. Gradients match either way.
    from tests.host_syncs import HostSyncs

    _, directory = hf_model(name)
    backbone = HFBackbone(ModelConfig(), path=directory).train()
    ids = _ids()
    with HostSyncs() as syncs:
        backbone(ids).logsumexp(-1).mean().backward()
    assert not syncs.found, syncs.report()
    assert backbone._inputs(ids, None, None)["use_cache"] is None
    with torch.no_grad():
        assert backbone._inputs(ids, None, None)["use_cache"] is False
    checkpointed = HFBackbone(ModelConfig(activation_checkpointing=True), path=directory).train()
    assert checkpointed._inputs(ids, None, None)["use_cache"] is False  # transformers turns it off


def test_generation_with_cache_left_padding_and_eos(hf_model):
    _, directory = hf_model("llama")
    backbone = HFBackbone(ModelConfig(), path=directory).eval()
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0 is a 4-token prompt, left-padded
    cached = generate(backbone, ids, mask, max_new_tokens=6)
    assert torch.equal(cached, generate(backbone, ids, mask, max_new_tokens=6, use_cache=False))
    alone = generate(backbone, ids[:1, 2:], None, max_new_tokens=6)
    assert torch.equal(cached[:1], alone)
    eos = int(cached[1, 2])
    stopped = generate(backbone, ids[1:], None, max_new_tokens=6, eos_id=eos, pad_id=-1)
    assert stopped[0, 2] == eos and (stopped[0, 3:] == -1).all()


def test_lora_targets_the_hf_linear_layers(hf_model):
    _, directory = hf_model("llama")
    backbone = HFBackbone(ModelConfig(), path=directory)
    strategy = build_peft_strategy({"method": "lora", "r": 2,
                                    "target_modules": ["q_proj", "v_proj", "down_proj"]})
    strategy.check(backbone)
    backbone = strategy.apply(backbone)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = backbone(_ids()).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


def test_shape_probe_on_meta_device_loads_nothing(hf_model):
    _, directory = hf_model("llama")
    with torch.device("meta"):
        backbone = HFBackbone(ModelConfig(vocab_size=VOCAB), path=directory)
    assert all(p.is_meta for p in backbone.parameters())


def test_foreign_tokenizer_ids_are_shifted(hf_model, tmp_path):
    hf, source = hf_model("llama")
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    write_word_tokenizer(tmp_path, words, {"bos_token": "<s>", "eos_token": "</s>",
                                           "unk_token": "<unk>"})
    assert lmlab_id_offset(tmp_path) == 6
    config = ModelConfig(vocab_size=6 + len(words), pad_vocab_multiple=64)
    backbone = HFBackbone(config, path=tmp_path).eval()
    assert backbone.id_offset == 6 and backbone(_ids()).shape[-1] == 128
    ids = _ids()
    with torch.no_grad():
        ours = backbone(ids + 6)[..., 6:6 + VOCAB]
        assert (ours - hf(ids).logits).abs().max() <= 1e-5
    embed = backbone.hf.get_input_embeddings().weight
    # lmlab <bos>/<eos> start as the model's own bos/eos (ids 1, 2 in the HF config)
    assert torch.equal(embed[1], hf.get_input_embeddings().weight[1])
    assert torch.equal(embed[2], hf.get_input_embeddings().weight[2])


def test_bad_directories_are_config_errors(hf_model, tmp_path):
    with pytest.raises(ConfigError) as err:
        HFBackbone(ModelConfig())
    assert err.value.field == "model.hf_path"
    with pytest.raises(ConfigError, match="no such directory"):
        HFBackbone(ModelConfig(), path=tmp_path / "missing")
    with pytest.raises(ConfigError, match="causal"):
        HFBackbone(ModelConfig(), path=hf_model("t5")[1])


def test_clm_task_trains_and_generates_with_lora(tmp_path):
    """model=hf end to end: tokenizer=hf on the model's tokenizer.json, LoRA, clm task with
    exact-match generation (what `assemble` does, minus Hydra)."""
    from lmlab.data import SyntheticTasksDataModule
    from lmlab.tasks import CausalLMTask
    from tests.models.hf.conftest import transformers
    from tests.tasks.conftest import adamw, fit

    words = ["<unk>", "</s>", "add", ":"] + [str(i) for i in range(110)]
    write_word_tokenizer(tmp_path, words, {"unk_token": "<unk>", "eos_token": "</s>"})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=1)).save_pretrained(str(tmp_path))

    dm = SyntheticTasksDataModule(tasks=["add_1"], n_train=32, n_val=8, n_test=8, batch_size=8,
                                  eval_batch_size=8, tokenizer={"kind": "hf", "path": str(tmp_path)},
                                  cache_dir=tmp_path / "cache")
    dm.setup("fit")
    tok = dm.tokenizer
    backbone = HFBackbone(ModelConfig(vocab_size=tok.vocab_size), path=tmp_path,
                          id_offset=tok.id_offset)
    assert backbone.config.d_model == 32  # the HF model's width, for pooling heads
    backbone = build_peft_strategy({"method": "lora", "r": 2}).apply(backbone)
    task = CausalLMTask(backbone, tok, adamw(), max_new_tokens=dm.max_target_length)
    metrics = fit(task, dm, steps=2, val_batches=1, test=False)
    assert metrics["val/loss"] > 0 and 0.0 <= metrics["val/acc"] <= 1.0


def test_save_pretrained_drops_the_shift(hf_model, tmp_path):
    from tests.models.hf.conftest import transformers

    hf, directory = hf_model("llama")
    backbone = HFBackbone(ModelConfig(vocab_size=VOCAB + 6), path=directory, id_offset=6).eval()
    backbone.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = _ids()
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max() <= 1e-5
        assert backbone(ids + 6).shape[-1] == 128  # the backbone keeps its own layout
