"""Which layers compression touches: the backbone's Linear layers, not its heads.

Embeddings are lookups, not matmuls, and are never touched. The output layers (`lm_head`,
BERT's `mlm_transform`) map to the vocabulary, where a pruned or quantised row hurts every
prediction of that token: they are left alone unless `include_lm_head` is set, and a
`lm_head` tied to the embedding is never touched (it *is* the embedding). MoE routers are
left alone too: they are tiny and a perturbed router sends tokens to other experts.
"""

from __future__ import annotations

from torch import nn

HEAD_PREFIXES = ("lm_head", "mlm_transform")


def compressible_linears(backbone: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """name → Linear layer, in module order."""
    embedding_weights = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, nn.Linear] = {}
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.split(".")[-1] == "router":
            continue
        if name.startswith(HEAD_PREFIXES) and not include_lm_head:
            continue
        if id(module.weight) in embedding_weights:
            continue
        out[name] = module
    return out
