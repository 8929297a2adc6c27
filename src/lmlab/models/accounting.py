"""Parameter accounting: how many parameters a model has, and how many one token uses.

A mixture of experts stores n_experts FFNs per MoE layer but runs each token through only a
few, so its per-token compute follows the active count, not the total.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.models.config import ModelConfig
from lmlab.models.layers.moe import moe_layers


def experts_per_token(config: ModelConfig) -> float:
    """Experts one token passes through in an MoE layer, on average.

    Token choice: top_k (an upper bound when a capacity drops overflow). Expert choice: each
    expert takes capacity_factor * top_k * tokens / n_experts tokens, so a token is processed
    by capacity_factor * top_k experts on average (a missing factor reads as 1).
    """
    if config.router == "expert_choice":
        factor = 1.0 if config.capacity_factor is None else config.capacity_factor
        return min(float(config.n_experts), factor * config.top_k)
    return float(config.top_k)


def parameter_report(model: nn.Module, config: ModelConfig) -> dict[str, int]:
    """{"total", "trainable", "active_per_token"}; a tied weight is counted once.

    active_per_token = every non-expert parameter (embeddings, attention, routers, norms,
    dense FFNs) + `experts_per_token` experts of each MoE layer.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idle = 0.0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        idle += (layer.n_experts - experts_per_token(config)) * per_expert
    return {"total": total, "trainable": trainable, "active_per_token": round(total - idle)}


def state_report(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Generation memory: {"kv_cache_bytes_per_token", "ssm_state_bytes_per_sequence"}.

    Attention layers cache keys and values (n_kv_heads * head_dim each) for every position
    (all of them, also with a sliding window: the window is a mask over the full cache).
    Mamba layers keep a constant state per sequence: d_conv - 1 conv inputs in `dtype` and a
    float32 SSM state of d_state per channel.
    """
    mixers = config.layer_mixers
    n_attention, n_mamba = mixers.count("attention"), mixers.count("mamba")
    size = torch.empty((), dtype=dtype).element_size()
    kv = 2 * n_attention * config.kv_heads * config.head_dim * size
    conv = (config.d_conv - 1) * size
    ssm = config.d_state * torch.empty((), dtype=torch.float32).element_size()
    return {"kv_cache_bytes_per_token": kv,
            "ssm_state_bytes_per_sequence": n_mamba * config.d_inner * (conv + ssm)}
