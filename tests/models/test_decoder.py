"""DecoderLM structure: parameter names, vocabulary padding, init, tying, families."""

import math

import pytest
import torch
from torch import nn

from lmlab.models import DecoderLM, ModelConfig, build_backbone


def _linear_suffixes(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("ffn", ["relu", "gelu", "swiglu"])
def test_linear_layer_names_are_stable(make_model, ffn):
    names = _linear_suffixes(make_model(ffn=ffn, n_kv_heads=2))
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"}
    assert names == expected | ({"gate_proj"} if ffn == "swiglu" else set())


def test_module_layout(make_model):
    names = dict(make_model(position="learned").named_modules())
    for name in ("embed_tokens", "pos_embed", "norm", "lm_head", "layers.1.attn_norm",
                 "layers.1.attn.q_proj", "layers.1.ffn_norm", "layers.1.ffn.up_proj"):
        assert name in names


def test_vocab_padding_and_tying(make_model):
    model = make_model(vocab_size=100, d_model=32)
    assert model.embed_tokens.weight.shape == (128, 32)
    assert model.lm_head.weight.shape == (128, 32)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model(torch.tensor([[1, 2, 99]])).shape == (1, 3, 128)
    untied = make_model(vocab_size=100, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() == model.num_parameters() + 128 * 32


def test_norm_kinds(make_model):
    assert isinstance(make_model(norm="rmsnorm").norm, nn.RMSNorm)
    assert isinstance(make_model(norm="layernorm").layers[0].attn_norm, nn.LayerNorm)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=8, n_heads=4, init_std=0.02)
    model = DecoderLM(cfg)
    q = model.layers[0].attn.q_proj.weight.std().item()
    o = torch.cat([layer.attn.o_proj.weight.flatten() for layer in model.layers]).std().item()
    assert q == pytest.approx(0.02, rel=0.1)
    assert o == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert torch.all(model.layers[0].attn.q_proj.bias == 0)


def test_num_parameters_trainable_only(make_model):
    model = make_model()
    total = model.num_parameters()
    model.embed_tokens.weight.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == total - 64 * 32


def test_build_backbone_dispatches_on_family():
    model = build_backbone(ModelConfig(vocab_size=10, d_model=32, n_heads=4, n_layers=1))
    assert isinstance(model, DecoderLM)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_training_step_is_finite_with_padding_and_dropout(make_model, position):
    model = make_model(position=position, dropout=0.1, ffn="swiglu", n_kv_heads=2).train()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    logits = model(ids, mask)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                       reduction="none")
    loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_attention_mask_shape_is_checked(make_model):
    with pytest.raises(ValueError, match="attention_mask"):
        make_model()(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(n_kv_heads=2, ffn="swiglu", norm="rmsnorm", position="rope", bias=False),
    dict(layer_pattern="MA"),  # attention last: it selects its rows
    dict(layer_pattern="AM"),  # a Mamba layer last: every row, taken after
    dict(ffn="moe", n_experts=4, top_k=2),  # every row, taken after (selects_rows)
    dict(activation_checkpointing=True),
], ids=["gpt", "gqa", "hybrid-attention-last", "hybrid-mamba-last", "moe", "checkpointing"])
def test_output_rows_equal_those_rows_of_the_full_output(make_model, overrides):
    # task=classify's last-token pooling on a decoder asks for one position a sequence: the
    # last layer computes only it after attention, with the values and gradients of the full
    # output's rows.
    model = make_model(**overrides).double().train()
    ids = torch.randint(5, model.config.vocab_size, (3, 12))
    rows = torch.tensor([11, 12 + 5, 24 + 8])
    outs, grads = [], []
    for call in (lambda: model.hidden(ids, output_rows=rows),
                 lambda: model.hidden(ids).flatten(0, 1)[rows]):
        out = call()
        params = list(model.parameters())
        grads.append(torch.autograd.grad(out.square().sum(), params, allow_unused=True))
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads, strict=True):
        if a is None or b is None:  # MoE: an expert no token of these rows reached
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    last = model.config.n_layers - 1
    selects = "moe" not in str(overrides) and "AM" not in str(overrides)
    assert model.output_row_modules() == (
        (f"layers.{last}.attn.o_proj", f"layers.{last}.ffn") if selects else ())
