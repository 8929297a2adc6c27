"""The encoder and encoder-decoder families against their transformers equivalents.

A random `BertForMaskedLM` / `T5ForConditionalGeneration` (T5 v1.1 style gated-SiLU, no
dropout) at the bench dimensions is saved and imported with `lmlab.models.hf.import_hf`, the
outputs are checked equal, then training tokens/s (fp32, eager, fused AdamW on both sides)
are compared, each side computing its loss the way its users do:

- bert: the mlm task's step (backbone, without the attention mask for this batch without
  padding as the task calls it, its last layer computing only the 15% chosen positions after
  attention (`output_rows`), MLM head on those positions only, fp32 cross-entropy) vs
  `BertForMaskedLM(input_ids, attention_mask, labels=...)`, which runs its last layer and head
  on every position. A second row does the same work on both sides, the model code compared:
  lmlab's last layer on every position too, HF's head on the same chosen positions (`hf.cls`
  on the gathered hidden states).
- t5: the seq2seq task's step (the fused output layer + loss over the real vocabulary) vs
  `T5ForConditionalGeneration(input_ids, attention_mask, decoder_input_ids, labels)`.
Tokens are input positions: all of them for bert, source + target for t5 (S = T = seq_len).
The losses of the timed steps are checked equal before anything is timed.
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.nn.functional as F

from bench.common import (
    Row,
    Size,
    adamw,
    cpu_speedup,
    interleaved,
    paired_speedup,
    rate_row,
    training_repeats,
)
from lmlab.models import build_backbone
from lmlab.models.hf import import_hf

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
GOAL = 1.05


def _imported(hf_model) -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        config, state = import_hf(directory)
    config.dropout = 0.0
    model = build_backbone(config)
    model.load_state_dict(state)
    return model


def _check(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    diff = (a[..., : b.shape[-1]] - b).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"{what}: lmlab and HF outputs differ by {diff}")
    return diff


def _compare(size: Size, name: str, lmlab, hf, lmlab_step, hf_step, tokens: int,
             diff: float, device: torch.device | str = "cpu", what: str = "") -> Row:
    loss_diff = (lmlab_step() - hf_step()).abs().item()  # the timed code paths, with autograd
    if loss_diff > 1e-4:
        raise AssertionError(f"{name}: lmlab and HF losses differ by {loss_diff}")
    optimizers = {k: adamw(m) for k, m in (("lmlab", lmlab), ("hf", hf))}
    steps = {"lmlab": lmlab_step, "hf": hf_step}

    def run(side):
        for _ in range(size.steps):
            steps[side]().backward()
            optimizers[side].step()
            optimizers[side].zero_grad(set_to_none=True)

    times = interleaved({k: (lambda k=k: run(k)) for k in steps}, training_repeats(size),
                        device=device)
    tok = {k: tokens * size.steps / t for k, t in times.items()}
    return rate_row(name, f"training tok/s, fp32 eager{what}", tok["lmlab"], tok["hf"], GOAL,
                    [f"outputs equal to {diff:.0e}, losses to {loss_diff:.0e}"], cpu_speedup(),
                    paired_speedup())


def bert_rows(size: Size, device: torch.device | str = "cpu") -> list[Row]:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(
        vocab_size=size.vocab, hidden_size=size.d_model, num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads, intermediate_size=size.d_ff,
        max_position_embeddings=size.seq_len, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).train()
    lmlab, hf = _imported(hf).train().to(device), hf.to(device)
    ids = torch.randint(6, size.vocab, (size.batch, size.seq_len), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        diff = _check(lmlab.mlm_logits(lmlab(ids, mask)), hf(ids, attention_mask=mask).logits,
                      "bert")
    chosen = torch.rand(ids.shape, device=device) < 0.15
    labels = torch.where(chosen, ids, -100)
    rows = chosen.flatten().nonzero().squeeze(1)  # the task gets them from its host-side masking
    targets = ids.flatten()[rows]

    # As the mlm task calls its backbone: a batch without padding goes without the all-ones
    # mask (decided on the host); HF drops such a mask itself (no mask reaches its SDPA).
    lmlab_mask = None if bool(mask.all()) else mask

    def lmlab_step():
        logits = lmlab.mlm_logits(lmlab(ids, lmlab_mask, output_rows=rows))
        return F.cross_entropy(logits[:, : size.vocab].float(), targets)

    def lmlab_every_position_step():
        logits = lmlab.mlm_logits(lmlab(ids, lmlab_mask).flatten(0, 1)[rows])
        return F.cross_entropy(logits[:, : size.vocab].float(), targets)

    def hf_step():
        return hf(ids, attention_mask=mask, labels=labels).loss

    def hf_same_positions_step():
        hidden = hf.bert(ids, attention_mask=mask)[0]
        return F.cross_entropy(hf.cls(hidden[chosen]).float(), ids[chosen])

    # The second row starts from the same weights as the first (its training steps moved
    # both models: Adam makes their float rounding differences grow).
    start = [copy.deepcopy(m.state_dict()) for m in (lmlab, hf)]
    as_run = _compare(size, "bert vs BertForMaskedLM", lmlab, hf, lmlab_step, hf_step,
                      size.tokens, diff, device, "; lmlab's last layer after attention and "
                      "MLM head on the 15 % masked positions (the mlm task), HF's on every "
                      "position (BertForMaskedLM with labels=)")
    for model, state in zip((lmlab, hf), start, strict=True):
        model.load_state_dict(state)
    return [as_run, _compare(size, "bert vs BertForMaskedLM", lmlab, hf,
                             lmlab_every_position_step, hf_same_positions_step, size.tokens,
                             diff, device, "; same work: lmlab's last layer on every position "
                             "too, HF's head on the same masked positions (hf.cls on the "
                             "gathered states)")]


def t5_row(size: Size, device: torch.device | str = "cpu") -> Row:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(
        vocab_size=size.vocab, d_model=size.d_model, d_kv=size.d_model // size.n_heads,
        d_ff=size.d_ff, num_layers=size.n_layers, num_decoder_layers=size.n_layers,
        num_heads=size.n_heads, feed_forward_proj="gated-silu", dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).train()
    lmlab, hf = _imported(hf).train().to(device), hf.to(device)
    src = torch.randint(6, size.vocab, (size.batch, size.seq_len), device=device)
    tgt = torch.randint(6, size.vocab, (size.batch, size.seq_len + 1), device=device)
    tgt_in, tgt_out = tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous()
    src_mask = torch.ones_like(src)
    with torch.no_grad():
        diff = _check(lmlab(src, src_mask, tgt_in),
                      hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits,
                      "t5")

    def lmlab_step():
        # As the seq2seq task computes it: the fused output layer + loss, real vocabulary only.
        return lmlab(src, src_mask, tgt_in, labels=tgt_out, loss_vocab=size.vocab)

    def hf_step():
        return hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in,
                  labels=tgt_out).loss

    return _compare(size, "t5 vs T5ForConditionalGeneration", lmlab, hf, lmlab_step, hf_step,
                    2 * size.tokens, diff, device)


def rows(size: Size, device: torch.device | str = "cpu") -> list[Row]:
    return [*bert_rows(size, device), t5_row(size, device)]
