"""gradient_flow: which modules' inputs need a gradient, read from module order."""

from __future__ import annotations

from lmlab.gradient_flow import gradient_flow
from lmlab.models import ModelConfig, build_backbone

TINY = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def test_full_training_needs_every_input_gradient_and_frozen_none():
    from lmlab.peft import build_peft_strategy

    model = build_backbone(ModelConfig(**TINY))
    flow = gradient_flow(model)
    # The token embedding trains: everything after it needs input gradients (not the ids).
    assert not flow.pop("embed_tokens") and all(flow.values())
    frozen = build_peft_strategy({"method": "frozen"}).apply(build_backbone(ModelConfig(**TINY)))
    assert not any(gradient_flow(frozen).values())


def test_lora_starts_the_flow_after_its_own_layer_and_not_in_siblings():
    from lmlab.peft.lora import LoRA

    flow = gradient_flow(LoRA(target_modules=["q_proj"]).apply(build_backbone(ModelConfig(**TINY))))
    first = "layers.0.attn."
    assert not flow[first + "q_proj.base_layer"] and not flow[first + "q_proj.lora_A.default"]
    assert flow[first + "q_proj.lora_B.default"]  # reads A's output, which trains
    assert not flow[first + "k_proj"] and not flow[first + "v_proj"]  # the same input as q
    assert flow[first + "o_proj"] and flow["layers.1.attn.k_proj"] and flow["lm_head"]


def test_experts_and_router_are_branches_that_join_after_the_block():
    from lmlab.peft.lora import LoRA

    config = ModelConfig(**TINY, ffn="moe", n_experts=3, top_k=2)
    flow = gradient_flow(LoRA(target_modules=["down_proj"]).apply(build_backbone(config)))
    experts = "layers.0.ffn.experts"
    for i in range(3):  # no expert's input needs one because an earlier expert trains
        assert not flow[f"{experts}.{i}.up_proj"] and not flow[f"{experts}.{i}.down_proj.base_layer"]
        assert flow[f"{experts}.{i}.down_proj.lora_B.default"]
    assert flow["layers.1.attn.q_proj"]  # after the block: every branch's gradient flows on


def test_prompt_tuned_encoder_decoder_sends_gradients_through_the_source_only():
    from lmlab.peft.prompt import PromptTuning

    config = ModelConfig(**TINY, family="encoder_decoder", position="relative")
    model = PromptTuning(n_virtual_tokens=10, init="random").apply(build_backbone(config))
    flow = gradient_flow(model)
    assert flow["encoder.layers.0.attn.q_proj"]  # the soft prompt is in front of the source
    # The decoder's first self-attention reads the frozen target embeddings; the memory's
    # gradient enters at the cross-attention.
    assert not flow["decoder.layers.0.attn.q_proj"] and not flow["decoder.layers.0.cross_attn.q_proj"]
    assert flow["decoder.layers.0.cross_attn.k_proj"] and flow["decoder.layers.0.cross_attn.o_proj"]
