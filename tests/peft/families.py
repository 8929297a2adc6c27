"""Tiny backbones of every family, a fixed batch and a loss for each: what the prefix and
prompt tuning tests train and compare (a module, not a conftest, so both files import it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.models import ModelConfig, build_backbone

BASE = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
FAMILIES = {
    "gpt": dict(),
    "gqa-rope-qknorm": dict(position="rope", n_kv_heads=2, norm="rmsnorm", ffn="swiglu", bias=False,
                            qk_norm=True),
    "mqa-alibi-window": dict(position="alibi", n_kv_heads=1, sliding_window=3, global_tokens=1),
    "moe": dict(ffn="moe", n_experts=4, top_k=2),
    "hybrid": dict(layer_pattern="MA", ffn="swiglu", position="rope"),
    "mamba": dict(mixer="mamba", ffn="none", position="none"),
    "bert": dict(family="encoder", norm_position="post"),
    "transformer": dict(family="encoder_decoder", position="sinusoidal", norm_position="post",
                        ffn="relu", scale_embeddings=True),
    "t5": dict(family="encoder_decoder", position="relative", norm="rmsnorm", ffn="swiglu",
               bias=False, relative_buckets=8, relative_max_distance=16, n_kv_heads=2),
}
DECODERS = ["gpt", "gqa-rope-qknorm", "mqa-alibi-window", "moe", "hybrid"]


def make(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(**{**BASE, **FAMILIES[name], **overrides}))


def batch(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 50, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    family = FAMILIES[name].get("family", "decoder")
    if family == "encoder":
        mask[1, 6:] = 0  # right padding
    if family == "encoder_decoder":
        mask[2, 7:] = 0
        return {"src": ids * mask, "src_mask": mask, "tgt": torch.randint(6, 50, (4, 7), generator=g)}
    return {"ids": ids, "mask": mask}


def loss(model, name: str, b: dict[str, torch.Tensor]) -> torch.Tensor:
    family = FAMILIES[name].get("family", "decoder")
    if family == "encoder_decoder":
        logits = model(b["src"], b["src_mask"], b["tgt"][:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), b["tgt"][:, 1:].flatten())
    if family == "encoder":  # reconstruct the real input tokens
        logits = model.mlm_logits(model(b["ids"], b["mask"]))
        keep = b["mask"].bool()
        return F.cross_entropy(logits[keep], b["ids"][keep])
    logits = model(b["ids"][:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), b["ids"][:, 1:].flatten())


def train(model, name: str, steps: int = 8, lr: float = 3e-2) -> list[float]:
    """Adam on the trainable parameters over one fixed batch; the loss of every step."""
    model.train()
    b = batch(name)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(model, name, b)
        value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(value.item())
    return losses


def assert_only_changed(model, before: dict[str, torch.Tensor], prefix: str) -> None:
    """Parameters named `prefix...` changed; every other one is bit-identical to `before`."""
    changed = []
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            assert not torch.equal(param, before[name]), f"{name} did not train"
            changed.append(name)
        else:
            assert torch.equal(param, before[name]), f"{name} changed"
            assert not param.requires_grad, f"{name} is trainable"
    assert changed


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to one width, and their mask (1 = real)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_backbone(directory):
    """`model=hf` on a local directory (lmlab ids shifted past the specials, as tokenizer=hf does)."""
    from lmlab.models import ModelConfig
    from lmlab.models.hf_backbone import HFBackbone

    torch.manual_seed(0)
    return HFBackbone(ModelConfig(), path=directory)


def train_hf(model, steps: int = 8, lr: float = 3e-2) -> list[float]:
    """Next-token loss on a fixed batch of an `hf_backbone`; the loss of every step."""
    vocab = model.config.vocab_size
    ids = torch.randint(6, vocab, (4, 10), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        assert logits.shape[:2] == (4, 9)  # the input's positions only
        value = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(value.item())
    return losses
