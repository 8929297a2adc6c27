"""EncoderDecoderModel: incremental decoding, source padding, layout, T5 buckets, sinusoids."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models import EncoderDecoderModel, ModelConfig, build_backbone
from lmlab.models.layers.relative_position import relative_position_bucket

TINY = dict(family="encoder_decoder", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
            max_seq_len=32)
TRANSFORMER = dict(position="sinusoidal", norm_position="post", ffn="relu",
                   scale_embeddings=True)
T5 = dict(position="relative", norm="rmsnorm", ffn="swiglu", bias=False, relative_buckets=8,
          relative_max_distance=16)


def _model(seed: int = 0, **overrides) -> EncoderDecoderModel:
    torch.manual_seed(seed)
    return EncoderDecoderModel(ModelConfig(**{**TINY, **overrides})).eval()


def _batch():
    src = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    src_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    tgt = torch.tensor([[1, 20, 21, 22, 23, 24], [1, 30, 31, 32, 0, 0]])
    return src, src_mask, tgt


@pytest.mark.parametrize("overrides", [TRANSFORMER, T5, dict(position="learned"),
                                       dict(position="rope", n_kv_heads=2),
                                       dict(position="alibi", n_decoder_layers=3),
                                       dict(ffn="moe", n_experts=4, top_k=2, qk_norm=True),
                                       dict(sliding_window=2, position="rope")],
                         ids=["transformer", "t5", "learned", "rope-gqa", "alibi", "moe-qknorm",
                              "sliding"])
def test_incremental_decoding_equals_teacher_forcing(overrides):
    model = _model(**overrides)
    src, src_mask, tgt = _batch()
    full = model(src, src_mask, tgt)
    assert full.shape == (2, 6, 64)
    memory = model.encode(src, src_mask)
    cache = model.new_cache(2, tgt.shape[1])
    steps = [model.decode(tgt[:, :2], memory, src_mask, cache)]
    projected = cache.memory_kv
    steps += [model.decode(tgt[:, t:t + 1], None, src_mask, cache) for t in range(2, 6)]
    assert cache.memory_kv is projected  # cross-attention keys/values computed once
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [TRANSFORMER, T5], ids=["transformer", "t5"])
def test_source_padding_changes_nothing(overrides):
    model = _model(**overrides)
    src, src_mask, tgt = _batch()
    batched = model(src, src_mask, tgt)
    alone = model(src[1:, :3], None, tgt[1:])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    longer = torch.cat([src, torch.full((2, 4), 3)], dim=1)
    longer_mask = torch.cat([src_mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(longer, longer_mask, tgt), batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [TRANSFORMER, T5], ids=["transformer", "t5"])
def test_sdpa_matches_eager(overrides):
    model = _model(**overrides)
    eager = EncoderDecoderModel(dataclasses.replace(model.config, attn_impl="eager")).eval()
    eager.load_state_dict(model.state_dict())
    src, src_mask, tgt = _batch()
    torch.testing.assert_close(model(src, src_mask, tgt), eager(src, src_mask, tgt),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [TRANSFORMER, T5], ids=["transformer", "t5"])
def test_trains(overrides):
    model = _model(dropout=0.1, **overrides).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    src, src_mask, tgt = _batch()
    labels = torch.cat([tgt[:, 1:], torch.full((2, 1), 2)], dim=1).masked_fill(tgt == 0, -100)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(src, src_mask, tgt).flatten(0, 1),
                                           labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_layout_shared_embeddings_and_t5_bias():
    model = _model(**T5)
    names = set(model.state_dict())
    for name in ("embed_tokens.weight", "lm_head.weight", "encoder.relative_bias.weight",
                 "decoder.relative_bias.weight", "encoder.layers.1.attn.q_proj.weight",
                 "decoder.layers.1.cross_attn.k_proj.weight", "decoder.layers.0.cross_norm.weight",
                 "decoder.layers.0.ffn.gate_proj.weight", "encoder.norm.weight",
                 "decoder.norm.weight"):
        assert name in names
    assert not any("bias" in n and "relative_bias" not in n for n in names)  # bias=False
    assert not any(n.startswith(("encoder.layers", "decoder.layers")) and "relative" in n
                   for n in names)  # one bias table per stack, shared by its layers
    assert model.encoder.relative_bias.weight.shape == (8, 4)
    assert model.encoder.relative_bias.bidirectional and not model.decoder.relative_bias.bidirectional
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = _model(tie_embeddings=False)
    assert untied.num_parameters() == _model().num_parameters() + 64 * 32
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "lm_head"}
    assert isinstance(build_backbone(model.config), EncoderDecoderModel)


def test_scale_embeddings_multiplies_by_sqrt_d_model():
    scaled = _model(scale_embeddings=True, tie_embeddings=False, position="sinusoidal")
    plain = EncoderDecoderModel(dataclasses.replace(scaled.config, scale_embeddings=False)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.embed_tokens.weight.mul_(math.sqrt(32))
    src, src_mask, tgt = _batch()
    torch.testing.assert_close(scaled(src, src_mask, tgt), plain(src, src_mask, tgt),
                               atol=1e-5, rtol=1e-5)


def test_sinusoidal_table_is_vaswani():
    model = _model(position="sinusoidal")
    table = model.encoder.pos_embed.table
    d = 32
    for pos in (0, 1, 7, 31):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (6, 20), (4, 3)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_hf_t5(num_buckets, max_distance, bidirectional):
    t5_attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    q = torch.arange(0, 300, 7)
    k = torch.arange(0, 300, 3)
    relative = k[None, :] - q[:, None]
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = t5_attention._relative_position_bucket(relative, bidirectional, num_buckets,
                                                     max_distance)
    assert torch.equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() < num_buckets


@pytest.mark.parametrize("fields,field", [
    (dict(family="encoderdecoder"), "model.family"),
    (dict(norm_position="middle"), "model.norm_position"),
    (dict(family="decoder", norm_position="post"), "model.norm_position"),
    (dict(relative_buckets=0), "model.relative_buckets"),
    (dict(relative_buckets=3), "model.relative_buckets"),
    (dict(relative_buckets=32, relative_max_distance=16), "model.relative_max_distance"),
    (dict(n_decoder_layers=0), "model.n_decoder_layers"),
    (dict(mlm_head="yes"), "model.mlm_head"),
    (dict(scale_embeddings=1), "model.scale_embeddings"),
])
def test_bad_fields_raise_config_error(fields, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**TINY, **fields}).validate()
    assert info.value.field == field
    if field == "model.family":
        assert "encoder_decoder" in str(info.value) and "decoder" in info.value.valid


def test_unpadded_source_mask_is_dropped_with_the_same_outputs(monkeypatch):
    """An all-ones source mask is treated as no mask (one shared relative-bias table, unmasked
    cross-attention); outputs and gradients equal those with the mask kept."""
    import lmlab.models.encoder_decoder as encoder_decoder

    model = _model(**T5).train()
    src, _, tgt = _batch()
    full = torch.ones_like(src)
    assert encoder_decoder._unless_full(full) is None
    assert encoder_decoder._unless_full(_batch()[1]) is not None

    def step():
        out = model(src, full, tgt)
        return out, torch.autograd.grad(out.square().sum(), list(model.parameters()))

    dropped, dropped_grads = step()
    monkeypatch.setattr(encoder_decoder, "_unless_full", lambda mask: mask)
    kept, kept_grads = step()
    torch.testing.assert_close(dropped, kept, atol=1e-5, rtol=1e-5)
    for a, b in zip(dropped_grads, kept_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("smoothing,reduction", [(0.0, "mean"), (0.1, "sum")])
def test_forward_with_labels_is_the_cross_entropy_of_the_real_vocab(tie, smoothing, reduction):
    """forward(labels=...) (the fused output layer + loss) against F.cross_entropy of the
    logits sliced to the real vocabulary: loss and every gradient."""
    model = _model(tie_embeddings=tie, **T5).train()
    src, src_mask, tgt = _batch()
    labels = torch.cat([tgt[:, 1:], torch.full((2, 1), 2)], dim=1).masked_fill(tgt == 0, -100)
    vocab = 50  # padded to 64 in the model
    params = list(model.parameters())
    fused = model(src, src_mask, tgt, labels=labels, label_smoothing=smoothing,
                  reduction=reduction, loss_vocab=vocab)
    fused_grads = torch.autograd.grad(fused, params)
    logits = model(src, src_mask, tgt)[..., :vocab]
    reference = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                            ignore_index=-100, label_smoothing=smoothing,
                                            reduction=reduction)
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)



def test_fused_memory_projection_changes_no_value_or_gradient(monkeypatch):
    """Cross-attention keys and values projected by one matmul against the separate
    projections: same loss and gradients, same parameter names. A hooked projection keeps
    its own module."""
    import lmlab.models.layers.cross_attention as cross_attention
    import lmlab.models.layers.fused_projection as fused_projection

    model = _model(**T5).train()
    names = [name for name, _ in model.named_parameters()]
    src, src_mask, tgt = _batch()
    calls, hook_calls = [], []
    monkeypatch.setattr(cross_attention, "concatenated_linear",
                        lambda *a: calls.append(1) or fused_projection.concatenated_linear(*a))
    model.decoder.layers[1].cross_attn.v_proj.register_forward_hook(
        lambda *a: hook_calls.append(1))

    def step():
        out = model(src, src_mask, tgt)
        return out, torch.autograd.grad(out.square().sum(), list(model.parameters()))

    fused, fused_grads = step()
    assert calls == [1] and hook_calls == [1]  # layer 0 fused, layer 1 through its modules
    assert [name for name, _ in model.named_parameters()] == names
    monkeypatch.setattr(cross_attention, "fusable", lambda parts: False)
    separate, separate_grads = step()
    assert calls == [1]
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(names, fused_grads, separate_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
