"""Which parts of a model run backward in a training step: autograd computes no gradient
below the lowest trainable parameter, so FLOP counts (`lmlab.flops`) must not count one there.

Also what the FLOP counts share with it: the names peft gives the parts of an adapted layer,
which tokens an encoder-decoder's module runs on, and the virtual tokens prompt and prefix
tuning add.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def _trains_here(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def gradient_flow(backbone: nn.Module) -> dict[str, bool]:
    """Module name -> whether the module's input needs a gradient in a training step, i.e.
    whether anything it depends on trains. Autograd computes no input gradient (and no
    attention or scan backward) below the lowest trainable parameter: a frozen backbone under
    a classifier head runs no backward at all, LoRA on the output layer only none in the body.

    Read in module order, which is data-flow order in lmlab's models (embeddings, layers in
    turn, the output layer): a module's input needs a gradient once a module before it trains
    (its own parameters come after its input), except where modules read one input side by
    side:
    - projections of one input (q/k/v, gate/up) all see the flow as it was at the first of
      them: an adapted q_proj does not give k_proj's input a gradient;
    - a mixture of experts' router and experts, and a parallel-residual model=hf layer's
      attention and MLP, are branches of their own whose flows join after the block.
    peft's IA3 on a feed-forward module scales that module's input, so the input needs a
    gradient. Prompt tuning's soft prompt trains in front of the first layer, prefix tuning's
    keys in every attention layer (its output projection on). Encoder-decoders carry two
    flows: the source's (embeddings, encoder) reaches the decoder through the cross-attention
    keys/values, the target's through the decoder."""
    prompt, prefix = virtual_tokens(backbone)
    trained = {name for name, m in backbone.named_modules() if _trains_here(m)}
    two_flows = isinstance(getattr(backbone, "decoder", None), nn.Module) and isinstance(
        getattr(backbone, "encoder", None), nn.Module)
    source_modules = ("encoder.",) if two_flows else ()
    shared = {"embed_tokens", "soft_prompt"}
    # The soft prompt goes in front of the source (encoder-decoders) or of the input.
    flows = {"source": bool(prompt), "target": bool(prompt) and not two_flows}
    # peft's IA3 on a feed-forward module scales the module's input: that input needs one.
    scaled_inputs = {f"{name}.base_layer" for name, m in backbone.named_modules()
                     if getattr(m, "is_feedforward", False) and isinstance(
                         getattr(m, "ia3_l", None), nn.Module)
                     and any(p.requires_grad for p in m.ia3_l.parameters())}
    out: dict[str, bool] = {}
    at_group_start: dict[tuple[str, str], dict[str, bool]] = {}
    parallel = _parallel_residual(backbone)
    fork: dict[str, Any] | None = None  # the block of parallel branches being read
    for name, _ in backbone.named_modules():
        if not name:
            continue
        base = ADAPTER_PARTS.sub("", name)
        # A mixture of experts' router and experts, or a parallel-residual layer's attention and
        # MLP, read the block's input side by side; after the block, whatever trains in any of
        # them sends gradients on.
        branch, which = _MOE_BRANCH.match(base), None
        if branch and not (branch.group(2) == "experts" and branch.group(3) is None):
            which = branch.group(2) + (branch.group(3) or "")  # (not the experts' list itself)
        elif branch is None and parallel:
            branch = _PARALLEL_BRANCH.match(base)
            which = branch.group(2) if branch else None
        block = branch.group(1) if branch else None
        if fork is not None and block != fork["block"]:
            flows, fork = _either(fork["ends"], flows), None
        if which is not None:
            if fork is None:
                fork = {"block": block, "start": dict(flows), "ends": dict(flows), "branch": None}
            if which != fork["branch"]:
                fork["ends"], flows = _either(fork["ends"], flows), dict(fork["start"])
                fork["branch"] = which
        if prefix and MIXER_OUTPUTS["self"].search(base):
            # The attention over the prefix keys trains them.
            flows["source" if base.startswith(source_modules) else "target"] = True
        if base.endswith("cross_attn.o_proj") and flows["source"]:
            flows["target"] = True  # the memory's gradient comes back through it
        parent, _, leaf = base.rpartition(".")
        seen = flows
        # A LoRA B matrix reads its A's output, not the shared input.
        if leaf in _SHARED_INPUT and not _LORA_B.search(name):
            seen = at_group_start.setdefault((parent, _SHARED_INPUT[leaf]), dict(flows))
        out[name] = seen[token_side(name) if two_flows else "target"] or name in scaled_inputs
        if name in trained:
            top = name.split(".")[0]
            if top in shared:
                flows["source"] = flows["target"] = True
            else:
                flows["source" if name.startswith(source_modules) else "target"] = True
    return out


# The output projections of attention and Mamba mixers: whether their input needs a gradient
# says whether the scores / the scan before them run backward (lmlab's names, and the common
# ones of transformers' causal LMs for model=hf).
MIXER_OUTPUTS = {
    "cross": re.compile(r"(^|\.)cross_attn\.o_proj$"),
    "self": re.compile(r"(^|\.)(attn|self_attn|attention)\.(o_proj|c_proj|out_proj|dense)$"),
    "mamba": re.compile(r"(^|\.)mamba\.out_proj$"),
}


def _either(a: dict[str, bool], b: dict[str, bool]) -> dict[str, bool]:
    return {side: a[side] or b[side] for side in a}


# A module inside a mixture of experts: (block, "router"/"gate"/"experts", ".N" of an expert).
_MOE_BRANCH = re.compile(r"^(.*)\.(router|gate|experts)(\.\d+)?(\.|$)")
# A module of a parallel-residual transformers layer: (layer, its attention or MLP).
_PARALLEL_BRANCH = re.compile(r"^(.*\.(?:layers|h)\.\d+)\.(attention|attn|self_attn|self_attention|mlp)(\.|$)")
_PARALLEL_MODEL_TYPES = ("gptj", "phi", "codegen")


def _parallel_residual(backbone: nn.Module) -> bool:
    """model=hf whose layers compute attention and MLP from the same input, x + attn(x) +
    mlp(x) (GPT-NeoX/Pythia by default, GPT-J, Phi, Falcon's parallel_attn)."""
    hf = getattr(backbone, "hf", None)
    hf = getattr(hf, "peft_model", hf)  # prompt learning wraps the HF model
    config = getattr(hf, "config", None)
    if config is None:
        return False
    return bool(getattr(config, "use_parallel_residual", False)
                or getattr(config, "parallel_attn", False)
                or getattr(config, "model_type", None) in _PARALLEL_MODEL_TYPES)


# Projections that read one input side by side, by group.
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                 "up_proj": "gate_up"}
_LORA_B = re.compile(r"\.lora_B(\.\w+)?$")

# What peft puts under an adapted Linear (`k_proj.base_layer`, `k_proj.lora_A.default`, ...).
ADAPTER_PARTS = re.compile(r"\.(base_layer|lora_\w+|lora_magnitude_vector|ia3_\w+)(\.\w+)?$")


def token_side(name: str) -> str:
    """encoder_decoder: which tokens a module runs on."""
    name = ADAPTER_PARTS.sub("", name)
    if name.startswith("encoder.") or (".cross_attn." in name and name.endswith(("k_proj", "v_proj"))):
        return "source"
    return "target"


def virtual_tokens(backbone: nn.Module) -> tuple[int, int]:
    """(soft-prompt positions, prefix keys) a prompt- or prefix-tuned backbone adds to every
    sequence; (0, 0) for any other."""
    prompt = getattr(backbone, "soft_prompt", None)
    if prompt is not None:
        return int(prompt.n_virtual_tokens), 0
    prefix = getattr(backbone, "prefix_encoder", None)
    if prefix is not None:
        return 0, int(prefix.n_virtual_tokens)
    for module in backbone.modules():  # model=hf: peft's PeftModel inside the HFBackbone
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and getattr(module, "active_adapter", None) in configs:
            config = configs[module.active_adapter]
            n = int(getattr(config, "num_virtual_tokens", 0) or 0)
            kind = str(getattr(config, "peft_type", ""))
            if kind.endswith("PROMPT_TUNING"):
                return n, 0
            if kind.endswith("PREFIX_TUNING"):
                return 0, n
    return 0, 0
