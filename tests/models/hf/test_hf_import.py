"""import_hf: tiny random HF models -> lmlab backbones with the same logits (fp32, <= 1e-4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import build_backbone
from lmlab.models.hf import SUPPORTED_ARCHITECTURES, import_hf, tokenizer_path
from tests.models.hf.conftest import VOCAB, write_word_tokenizer

TOL = 1e-4


def _imported(directory, **kwargs):
    config, state = import_hf(directory, **kwargs)
    model = build_backbone(config).eval()
    model.load_state_dict(state, strict=True)
    return config, model


def _ids(batch: int = 2, length: int = 9, low: int = 0) -> torch.Tensor:
    return torch.randint(low, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["llama", "llama_tied", "llama_linear_rope", "gpt2"])
def test_causal_lm_logits_match(hf_model, name):
    hf, directory = hf_model(name)
    config, model = _imported(directory)
    assert config.family == "decoder" and config.vocab_size == VOCAB
    ids = _ids()
    with torch.no_grad():
        ours, ref = model(ids)[..., :VOCAB], hf(ids).logits
    assert (ours - ref).abs().max() <= TOL
    assert model(ids)[..., VOCAB:].abs().max() == 0  # padding rows are zero


def test_llama_keeps_gqa_rope_and_tying(hf_model):
    config, _ = import_hf(hf_model("llama")[1])
    assert (config.n_heads, config.kv_heads, config.ffn, config.norm, config.position,
            config.bias, config.tie_embeddings) == (4, 2, "swiglu", "rmsnorm", "rope", False, False)
    assert config.rope_theta == 5000.0
    tied, _ = import_hf(hf_model("llama_tied")[1])
    assert tied.tie_embeddings
    scaled, _ = import_hf(hf_model("llama_linear_rope")[1])
    assert (scaled.rope_scaling, scaled.rope_scaling_factor) == ("linear", 2.0)


def test_gpt2_tanh_gelu_is_imported_with_a_warning(hf_model):
    hf, directory = hf_model("gpt2_gelu_new")
    with pytest.warns(UserWarning, match="tanh"):
        _, model = _imported(directory)
    ids = _ids()
    with torch.no_grad():
        assert (model(ids)[..., :VOCAB] - hf(ids).logits).abs().max() < 1e-2


def test_bert_mlm_logits_match_with_padding(hf_model):
    hf, directory = hf_model("bert")
    config, model = _imported(directory)
    assert (config.family, config.norm_position, config.mlm_head) == ("encoder", "post", True)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model.mlm_logits(model(ids, mask))[..., :VOCAB]
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= TOL


@pytest.mark.parametrize("name,ffn", [("t5", "relu"), ("t5_gated_silu", "swiglu")])
def test_t5_logits_match(hf_model, name, ffn):
    hf, directory = hf_model(name)
    config, model = _imported(directory)
    assert (config.family, config.ffn, config.position, config.n_decoder_layers) == (
        "encoder_decoder", ffn, "relative", 3)
    src = _ids(low=2)
    src_mask = torch.ones_like(src)
    src_mask[1, 5:] = 0
    tgt = _ids(length=6, low=2)
    tgt[:, 0] = 0  # T5's decoder_start_token_id
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        ours = model(src, src_mask, tgt)[..., :VOCAB]
    assert (ours - ref).abs().max() <= TOL


def test_pytorch_bin_weights_are_read_with_weights_only(hf_model, tmp_path):
    hf, directory = hf_model("llama")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    _, model = _imported(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert (model(ids)[..., :VOCAB] - hf(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("name,key", [("neox", "GPTNeoXForCausalLM"),
                                      ("t5_gated_gelu", "feed_forward_proj"),
                                      ("llama_yarn", "rope_type")])
def test_what_does_not_map_is_a_config_error(hf_model, name, key):
    with pytest.raises(ConfigError) as err:
        import_hf(hf_model(name)[1])
    assert err.value.field == "init_from" and key in str(err.value)
    if name == "neox":
        for arch in SUPPORTED_ARCHITECTURES:
            assert arch in str(err.value)


def test_missing_directory_config_fields_or_weights(hf_model, tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        import_hf(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="lacks 'hidden_size'"):
        import_hf(tmp_path)
    shutil.copy(hf_model("llama")[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no weights"):
        import_hf(tmp_path)


def test_ids_shifted_for_lmlab_hf_tokenizer(hf_model, tmp_path):
    """With tokenizer=hf, lmlab ids = HF ids + 6: rows move up, special rows copy HF's."""
    from lmlab.tokenizers import HFTokenizer, TokenizerConfig

    hf, source = hf_model("bert")
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(90)]
    write_word_tokenizer(tmp_path, words, {"pad_token": "[PAD]", "unk_token": "[UNK]",
                                           "cls_token": "[CLS]", "sep_token": "[SEP]",
                                           "mask_token": "[MASK]"})
    assert tokenizer_path(tmp_path) == tmp_path / "tokenizer.json"
    tok = HFTokenizer.train(TokenizerConfig(kind="hf", path=str(tmp_path)), [])
    assert tok.id_offset == 6 and tok.vocab_size == 6 + len(words)
    config, model = _imported(tmp_path, id_offset=tok.id_offset, vocab_size=tok.vocab_size)
    assert config.vocab_size == tok.vocab_size

    ids = torch.tensor([tok.encode("w3 w7 w1 w0 w9")])
    assert ids.min() >= 6
    with torch.no_grad():
        ref = hf(input_ids=ids - 6).logits
        ours = model.mlm_logits(model(ids))
    assert (ours[..., 6:6 + len(words)] - ref[..., :len(words)]).abs().max() <= TOL
    embed = model.embed_tokens.weight
    hf_embed = hf.get_input_embeddings().weight
    for lmlab_id, hf_id in {0: 0, 1: 2, 2: 3, 3: 1, 4: 4, 5: 3}.items():  # pad bos eos unk mask sep
        assert torch.equal(embed[lmlab_id], hf_embed[hf_id])


def test_tokenizer_with_more_ids_than_the_model_is_rejected(hf_model):
    with pytest.raises(ConfigError, match="embedding rows"):
        import_hf(hf_model("llama")[1], id_offset=6, vocab_size=VOCAB + 7)
