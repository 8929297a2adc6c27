"""`model.activation_checkpointing=true`: every family recomputes its layers in backward and gets
the gradients of the plain run — with dropout on (its masks are replayed) and with MoE auxiliary
losses (computed inside checkpointed layers) in the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lmlab.models import ModelConfig, build_backbone

MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
TINY = {"vocab_size": 40, "d_model": 32, "n_heads": 4, "max_seq_len": 32, "dropout": 0.1}
PRESETS = {  # preset -> its tiny shape
    "gpt": {"n_layers": 2},
    "gqa": {"n_layers": 2, "sliding_window": 4},
    "bert": {"n_layers": 2},
    "transformer": {"n_layers": 2},
    "t5": {"n_layers": 2},
    "moe": {"n_layers": 2, "n_experts": 4, "capacity_factor": 1.0},
    "mamba": {"n_layers": 2},
    "hybrid": {"n_layers": 4, "ffn": "moe", "n_experts": 4, "layer_pattern": "MMMA"},
}


def _model(name: str, checkpointing: bool) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(MODEL_DIR), version_base="1.3"):
        raw = dict(ModelConfig.from_dict(compose(name)).to_dict())
    config = ModelConfig.from_dict({**raw, **TINY, **PRESETS[name], "activation_checkpointing": checkpointing})
    torch.manual_seed(0)
    return build_backbone(config).train()


def _loss(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 40, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # padding reaches the masks, MoE routing and Mamba's state
    family = model.config.family
    if family == "encoder_decoder":
        out = model(ids, mask, torch.randint(6, 40, (3, 7), generator=g))
    elif family == "encoder":
        out = model.mlm_logits(model(ids, mask))
    else:
        out = model(ids, mask)
    loss = (out * torch.randn(out.shape, generator=g)).mean()
    aux = model.auxiliary_losses()
    return loss + sum(aux.values()) if aux else loss


def _grads(name: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    model = _model(name, checkpointing)
    layers = model.layers if hasattr(model, "layers") else model.encoder.layers
    calls = []
    layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post-hook
    torch.manual_seed(123)  # the dropout masks
    loss = _loss(model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("name", list(PRESETS))
def test_gradients_equal_the_plain_run(name):
    plain, plain_calls = _grads(name, checkpointing=False)
    checkpointed, ckpt_calls = _grads(name, checkpointing=True)
    assert plain_calls == 1 and ckpt_calls == 2, "the layer was not recomputed in backward"
    assert plain.keys() == checkpointed.keys()
    if name in ("moe", "hybrid"):  # the router gets gradients only through the auxiliary losses' path too
        assert any("router" in key for key in checkpointed)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["gpt", "transformer"])
def test_no_recompute_without_grad_or_in_eval(name):
    """Evaluation and generation (no grad, eval mode, a KV cache) take the plain path."""
    model = _model(name, checkpointing=True)
    layers = model.layers if hasattr(model, "layers") else model.encoder.layers
    calls = []
    layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post-hook
    with torch.no_grad():
        _loss(model)
    model.eval()
    _loss(model).backward()  # grad enabled but eval mode: nothing to save memory for
    assert len(calls) == 2


def test_field_must_be_a_boolean():
    from lmlab import ConfigError

    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        ModelConfig(vocab_size=40, activation_checkpointing="yes").validate()


def test_hf_backbone_uses_hf_gradient_checkpointing(tiny_hf_dir):
    from lmlab.models.hf_backbone import HFBackbone

    def grads(checkpointing):
        model = HFBackbone(ModelConfig(activation_checkpointing=checkpointing), path=tiny_hf_dir).train()
        calls = []
        # HF checkpoints inside the layer's __call__: its sub-modules are what run again
        model.hf.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
        _loss(model).backward()
        assert len(calls) == 1 + checkpointing
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["gqa", "t5", "hf"])
def test_emulated_bf16_is_recomputed_under_the_emulation(name, request):
    """bf16 on a CPU without bf16 GEMMs (`lmlab.precision.Bf16MatmulsInFp32`, entered by the
    step's forward context only): backward's recompute runs under the mode too (else it saves
    bf16 tensors where the forward saved fp32 ones and torch stops the run), and the gradients
    are the plain run's."""
    from lmlab.precision import Bf16MatmulsInFp32

    def grads(checkpointing):
        if name == "hf":
            from lmlab.models.hf_backbone import HFBackbone

            model = HFBackbone(ModelConfig(activation_checkpointing=checkpointing),
                               path=request.getfixturevalue("tiny_hf_dir")).train()
        else:
            model = _model(name, checkpointing)
        torch.manual_seed(123)
        with torch.autocast("cpu", torch.bfloat16), Bf16MatmulsInFp32():
            loss = _loss(model)
        loss.backward()  # outside the mode, as Lightning's backward is
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_compiled_checkpointed_layers_trace_without_a_context_fn():
    """Under torch.compile the recompute is the traced graph; compile refuses a `context_fn`
    that is not selective checkpointing's, so `checkpoint_layer` passes none there."""
    model = _model("gqa", checkpointing=True)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(123)
    _loss(compiled).backward()
    torch._dynamo.reset()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
