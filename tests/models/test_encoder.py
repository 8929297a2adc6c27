"""EncoderModel: padding invariance, bidirectionality, SDPA vs eager, pre/post-LN, MLM head."""

import dataclasses

import pytest
import torch
from torch import nn

from lmlab.models import DecoderLM, EncoderModel, ModelConfig, build_backbone

TINY = dict(family="encoder", vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "relative", "none"]


def _encoder(seed: int = 0, **overrides) -> EncoderModel:
    torch.manual_seed(seed)
    return EncoderModel(ModelConfig(**{**TINY, **overrides})).eval()


def _right_pad(rows: list[list[int]], width: int, pad_id: int = 0):
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("position", POSITIONS)
def test_real_tokens_do_not_depend_on_padding(position, norm_position):
    model = _encoder(position=position, norm_position=norm_position)
    rows = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]
    alone = [model(torch.tensor([r]))[0] for r in rows]
    for width, pad_id in ((5, 0), (9, 3)):  # different pad lengths and pad ids
        ids, mask = _right_pad(rows, width, pad_id)
        out = model(ids, mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(out[i, : len(r)], alone[i], atol=1e-5, rtol=1e-5)
    # Left padding too: positions are counted over real tokens.
    ids = torch.tensor([[0, 0, 10, 11, 12]])
    out = model(ids, torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(out[0, 2:], alone[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(ffn="moe", n_experts=4, top_k=2),
                                       dict(sliding_window=2, global_tokens=1)],
                         ids=["moe", "sliding"])
def test_padding_invariance_with_moe_and_sliding_window(overrides):
    model = _encoder(**overrides)
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids, mask = _right_pad(rows, 7)
    out = model(ids, mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(out[i, : len(r)], model(torch.tensor([r]))[0],
                                   atol=1e-5, rtol=1e-5)


def test_sliding_window_covering_the_sequence_is_full_attention():
    model = _encoder(position="rope")
    windowed = EncoderModel(dataclasses.replace(model.config, sliding_window=6)).eval()
    windowed.load_state_dict(model.state_dict())
    ids, mask = _right_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 6)
    torch.testing.assert_close(windowed(ids, mask), model(ids, mask), atol=1e-5, rtol=1e-5)
    narrow = EncoderModel(dataclasses.replace(model.config, sliding_window=2)).eval()
    narrow.load_state_dict(model.state_dict())
    assert not torch.allclose(narrow(ids, mask), model(ids, mask))


def test_attention_is_bidirectional():
    model = _encoder()
    a = model(torch.tensor([[5, 6, 7, 8]]))
    b = model(torch.tensor([[5, 6, 7, 9]]))
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first token sees the last one


@pytest.mark.parametrize("position", ["learned", "alibi", "relative"])
def test_sdpa_matches_eager(position):
    model = _encoder(position=position, n_kv_heads=2)
    eager = EncoderModel(dataclasses.replace(model.config, attn_impl="eager")).eval()
    eager.load_state_dict(model.state_dict())
    ids, mask = _right_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 6)
    torch.testing.assert_close(model(ids, mask), eager(ids, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids), eager(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_pre_and_post_ln_train(norm_position):
    model = _encoder(norm_position=norm_position, dropout=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask = _right_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 6)
    losses = []
    for _ in range(3):
        logits = model.mlm_logits(model(ids, mask))
        loss = nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_norm_placement():
    pre, post = _encoder(norm_position="pre"), _encoder(norm_position="post")
    assert hasattr(pre.encoder, "norm") and not hasattr(pre.encoder, "embed_norm")
    assert hasattr(post.encoder, "embed_norm") and not hasattr(post.encoder, "norm")
    x = torch.randn(1, 3, 32)
    layer = post.encoder.layers[0]
    # Post-LN: every block ends in its FFN norm, so the output is normalised per token.
    out = layer(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 3), atol=1e-5, rtol=0)


def test_mlm_head_layout_and_tying():
    model = _encoder(vocab_size=100)
    names = set(model.state_dict())
    for name in ("embed_tokens.weight", "encoder.pos_embed.weight", "encoder.layers.1.attn.q_proj.weight",
                 "encoder.layers.1.attn.k_proj.bias", "encoder.layers.0.ffn.up_proj.weight",
                 "encoder.layers.0.attn_norm.weight", "encoder.layers.0.ffn_norm.bias",
                 "encoder.norm.weight", "mlm_transform.dense.weight", "mlm_transform.norm.weight",
                 "lm_head.bias"):
        assert name in names
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.bias.shape == (128,)
    h = model(torch.tensor([[1, 2, 3]]))
    assert h.shape == (1, 3, 32)
    assert model.mlm_logits(h).shape == (1, 3, 128)
    assert model.mlm_logits(h[0, [0, 2]]).shape == (2, 128)  # just the masked positions
    torch.testing.assert_close(model.hidden(torch.tensor([[1, 2, 3]])), h)
    plain = _encoder(mlm_head=False, bias=False)
    assert plain.mlm_transform is None and plain.lm_head.bias is None
    h = plain(torch.tensor([[1, 2]]))
    torch.testing.assert_close(plain.mlm_logits(h), h @ plain.embed_tokens.weight.T)


def test_build_backbone_and_learned_position_limit():
    model = build_backbone(ModelConfig(**TINY))
    assert isinstance(model, EncoderModel)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 40, dtype=torch.long))


def test_decoder_hidden_is_lm_head_input(make_model):
    model = make_model()
    ids = torch.tensor([[1, 2, 3, 4]])
    hidden = model.hidden(ids)
    assert hidden.shape == (1, 4, 32)
    torch.testing.assert_close(model.lm_head(hidden), model(ids))


def test_decoder_relative_bias_and_embedding_scale(make_model):
    torch.manual_seed(0)
    model = make_model(position="relative", relative_buckets=8, relative_max_distance=16)
    assert model.relative_bias.weight.shape == (8, 4)
    ids = torch.randint(0, 50, (2, 7))
    full = model(ids)
    cache = model.new_cache(2, 7)
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # scale_embeddings multiplies the token embedding by sqrt(d_model) before positions.
    scaled = DecoderLM(dataclasses.replace(model.config, scale_embeddings=True,
                                           tie_embeddings=False)).eval()
    plain = DecoderLM(dataclasses.replace(model.config, tie_embeddings=False)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.embed_tokens.weight.mul_(32**0.5)
    torch.testing.assert_close(scaled(ids), plain(ids), atol=1e-5, rtol=1e-5)


NO_MASK_CASES = {
    **{f"position={p}": dict(position=p) for p in POSITIONS},
    "post-ln-rmsnorm-rope": dict(position="rope", norm="rmsnorm", norm_position="post"),
    "moe-topk-capacity": dict(ffn="moe", n_experts=4, top_k=2, capacity_factor=1.25),
    "moe-expert-choice": dict(ffn="moe", n_experts=4, top_k=2, router="expert_choice"),
    "window-global-qknorm": dict(sliding_window=3, global_tokens=1, qk_norm=True, norm="rmsnorm"),
    "checkpointing": dict(activation_checkpointing=True),
    "peft=prompt": dict(),
    "peft=prefix-alibi": dict(position="alibi"),
}


@pytest.mark.parametrize("case", list(NO_MASK_CASES))
def test_no_mask_equals_an_all_ones_mask(case):
    # The mlm task calls the backbone without the mask of a batch without padding
    # (MaskedLMTask.on_before_batch_transfer): outputs and gradients must be the ones an
    # all-ones mask gives, for every encoder lmlab builds.
    from lmlab.peft import build_peft_strategy

    model = _encoder(**NO_MASK_CASES[case]).train()
    if case.startswith("peft="):
        method = case.split("=")[1].split("-")[0]
        build_peft_strategy({"method": method, "n_virtual_tokens": 3}).apply(model)
    ids = torch.randint(4, 50, (3, 11))
    outs, grads = [], []
    for mask in (torch.ones_like(ids), None):
        model.zero_grad(set_to_none=True)
        out = model(ids, mask)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def _rows_and_full(model, ids, mask, rows):
    """(the states at `rows` computed with output_rows, the same rows of the full output),
    and both their parameter gradients for a loss on those rows."""
    outs, grads = [], []
    for call in (lambda: model(ids, mask, output_rows=rows),
                 lambda: model(ids, mask).flatten(0, 1)[rows]):
        out = call()
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(out.square().sum(), params, allow_unused=True))
        outs.append(out.detach())
    return outs, grads


@pytest.mark.parametrize("overrides", [
    dict(norm_position="post"),
    dict(norm_position="pre", position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2),
    dict(position="relative", dropout=0.0),
    dict(ffn="moe", n_experts=4, top_k=2),  # the last layer computes every row (selects_rows)
    dict(activation_checkpointing=True),
], ids=["post-ln", "pre-ln-rope-gqa", "relative", "moe", "checkpointing"])
def test_output_rows_equal_those_rows_of_the_full_output(overrides):
    # mlm asks for the masked positions' states only: the last layer computes just those rows
    # after its attention, with the same values and gradients as the full output's rows.
    model = _encoder(**overrides).double().train()
    ids, mask = _right_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]], 7)
    rows = torch.tensor([0, 3, 6, 8, 9, 14, 18])  # rows of the flattened [3 x 7] positions
    (part, full), (g_part, g_full) = _rows_and_full(model, ids.clone(), mask, rows)
    assert part.shape == (len(rows), model.config.d_model)
    torch.testing.assert_close(part, full, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_part, g_full, strict=True):
        if a is None or b is None:  # MoE: an expert no chosen token reached
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    expected = ("encoder.layers.1.attn.o_proj", "encoder.layers.1.ffn")
    assert model.output_row_modules() == (() if "moe" in str(overrides) else expected)


def test_output_rows_with_a_soft_prompt_and_under_lora():
    from lmlab.peft.lora import LoRA
    from lmlab.peft.prompt import PromptTuning

    ids, mask = _right_pad([[5, 6, 7, 8], [9, 10]], 4)
    rows = torch.tensor([1, 2, 5])
    for method in (PromptTuning(n_virtual_tokens=3, init="random"),
                   LoRA(target_modules=["o_proj", "up_proj"])):
        model = method.apply(_encoder().double().train())
        (part, full), (g_part, g_full) = _rows_and_full(model, ids, mask, rows)
        torch.testing.assert_close(part, full, rtol=1e-10, atol=1e-12)
        for a, b in zip(g_part, g_full, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        # A soft prompt's states are computed in full and the rows taken after; LoRA's
        # adapted last layer still computes the rows only.
        assert bool(model.output_row_modules()) == isinstance(method, LoRA)


def test_a_layer_that_cannot_select_rows_says_so():
    from lmlab.models.transformer_layer import TransformerLayer

    layer = TransformerLayer(ModelConfig(**TINY, ffn="moe", n_experts=2, top_k=1), causal=False)
    with pytest.raises(ValueError, match="output_rows"):
        layer(torch.randn(1, 3, 32), output_rows=torch.tensor([0]))
