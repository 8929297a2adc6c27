"""Turning token-id lists into padded tensors: causal-LM, seq2seq and classification batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the same column, ready for generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def causal_lm_batch(
    prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Sequences prompt+target, shifted for next-token prediction, loss only on the target part.

    `labels[b, t]` is the token that should follow `input_ids[b, t]`; IGNORE_INDEX where no loss
    is taken (prompt tokens and padding).
    """
    full = [list(p) + list(t) for p, t in zip(prompts, targets)]
    ids, mask = pad_right(full, pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        # Position len(p)-1 predicts the first target token.
        labels[i, len(p) - 1 : len(p) + len(t) - 1] = torch.as_tensor(t, dtype=torch.long)
    return {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "labels": labels[:, :-1]}


def seq2seq_batch(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], bos_id: int, eos_id: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Encoder input and teacher-forcing pairs for an encoder-decoder.

    `sources` are complete encoder inputs; `targets` are bare target ids. The decoder reads
    `tgt_in` = <bos> + target and is trained to emit `tgt_out` = target + <eos> (IGNORE_INDEX
    at the pads), so `tgt_out[b, t]` is the token that follows `tgt_in[b, t]`.
    """
    src_ids, src_mask = pad_right(sources, pad_id)
    tgt_in, tgt_mask = pad_right([[bos_id, *t] for t in targets], pad_id)
    tgt_out, _ = pad_right([[*t, eos_id] for t in targets], pad_id)
    tgt_out = tgt_out.masked_fill(tgt_mask == 0, IGNORE_INDEX)
    return {"src_ids": src_ids, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt_out, "tgt_mask": tgt_mask}


def classification_batch(sequences: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int) -> dict:
    """Right-padded token sequences (already framed with <bos>/<eos>) and one label each."""
    ids, mask = pad_right(sequences, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(list(labels), dtype=torch.long)}
