"""Decoding for encoder-decoder backbones: greedy and beam search.

Both run the encoder once and then one single-token decoder step per output token, with the
decoder's self-attention KV cache and cross-attention keys/values projected once (see
`EncoderDecoderModel.decode`). The model needs `encode`, `decode(tgt, memory, src_mask,
cache)` and `new_cache(batch, max_len)` whose cache has `reorder(index)`.

Beam search follows HF / GNMT-without-the-5: a finished hypothesis scores
sum(log p) / len**length_penalty with len counting the generated tokens including <eos>;
length_penalty > 0 favours longer outputs, < 0 shorter ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.generation import all_rows_done, inference_context, is_sharded
from lmlab.models.prepack import prepacked_linears
from lmlab.models.sampling import mask_padded_vocab


def generate_seq2seq(
    model: nn.Module,
    src_ids: Tensor,
    src_mask: Tensor | None,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int | None,
    pad_id: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """Translate each source row; return LongTensor [B, <= max_new_tokens] of new tokens.

    Output rows include their <eos> and are `pad_id` after it; the width is the longest
    output (max_new_tokens when some row never ends). `vocab_size` (default:
    `model.config.vocab_size`) excludes ids that only pad the vocabulary. num_beams=1 is
    greedy decoding.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    B = src_ids.shape[0]
    if max_new_tokens <= 0:
        return torch.full((B, 0), pad_id, dtype=torch.long, device=src_ids.device)

    was_training = model.training
    model.eval()
    try:
        # As in `generation.generate`: no autograd bookkeeping, prepacked CPU linears.
        with inference_context(model), prepacked_linears(model):
            memory = model.encode(src_ids, src_mask)
            if num_beams == 1:
                return _greedy(model, memory, src_mask, max_new_tokens, bos_id, eos_id,
                               pad_id, vocab_size)
            return _beam_search(model, memory, src_mask, max_new_tokens, bos_id, eos_id,
                                pad_id, num_beams, length_penalty, vocab_size)
    finally:
        model.train(was_training)


def _greedy(
    model: nn.Module,
    memory: Tensor,
    src_mask: Tensor | None,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int | None,
    pad_id: int,
    vocab_size: int | None,
) -> Tensor:
    B = memory.shape[0]
    device = memory.device
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # <bos> plus every generated token but the last is fed back: max_new_tokens positions.
    cache = model.new_cache(B, max_new_tokens)
    tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=device)
    sharded = is_sharded(model)
    for step in range(max_new_tokens):
        logits = model.decode(tokens, memory, src_mask, cache)[:, -1]
        next_ids = mask_padded_vocab(logits, vocab_size).argmax(dim=-1)
        out[:, step] = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        if eos_id is not None:
            done = done | (next_ids == eos_id)
            if all_rows_done(done, sharded):
                return out[:, : step + 1]
        tokens = next_ids[:, None]
    return out


def _beam_search(
    model: nn.Module,
    memory: Tensor,
    src_mask: Tensor | None,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int | None,
    pad_id: int,
    K: int,
    length_penalty: float,
    vocab_size: int | None,
) -> Tensor:
    """Batched beam search; rows b*K .. b*K+K-1 of the decoder batch are sentence b's beams."""
    B = memory.shape[0]
    device = memory.device
    N = max_new_tokens
    memory = memory.repeat_interleave(K, dim=0)
    if src_mask is not None:
        src_mask = src_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache(B * K, N)

    # Live hypotheses: summed log-probabilities; all K beams start as the same <bos>, so
    # only the first may expand at step 0 (else the K beams would be K copies of one).
    live_scores = torch.full((B, K), float("-inf"), device=device)
    live_scores[:, 0] = 0.0
    live_seqs = torch.full((B, K, N), pad_id, dtype=torch.long, device=device)
    # Finished hypotheses, best first: length-normalised score, tokens, length.
    fin_scores = torch.full((B, K), float("-inf"), device=device)
    fin_seqs = torch.full((B, K, N), pad_id, dtype=torch.long, device=device)
    fin_lens = torch.zeros((B, K), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rank = torch.arange(2 * K, device=device)
    row_offset = torch.arange(B, device=device)[:, None] * K

    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    sharded = is_sharded(model)
    for step in range(N):
        length = step + 1
        logits = model.decode(tokens, memory, src_mask, cache)[:, -1].float()
        logp = F.log_softmax(mask_padded_vocab(logits, vocab_size), dim=-1)
        V = logp.shape[-1]
        total = (live_scores[..., None] + logp.view(B, K, V)).view(B, K * V)
        # 2K candidates always hold K that do not end here (each beam has only one <eos>).
        cand_scores, cand_idx = total.topk(2 * K, dim=-1)
        cand_beam, cand_token = cand_idx // V, cand_idx % V
        cand_seqs = live_seqs.gather(1, cand_beam[..., None].expand(-1, -1, N)).clone()
        cand_seqs[:, :, step] = cand_token

        no_eos = torch.zeros_like(cand_token, dtype=torch.bool)
        is_eos = cand_token == eos_id if eos_id is not None else no_eos
        # As in HF: an <eos> ranked below the K best candidates does not finish a hypothesis;
        # this is what makes num_beams=1 exactly greedy.
        finishing = is_eos & (rank < K) & ~done[:, None]
        new_fin = torch.where(finishing, cand_scores / length**length_penalty,
                              torch.full_like(cand_scores, float("-inf")))
        fin_scores, fin_seqs, fin_lens = _keep_best(
            K, (fin_scores, fin_seqs, fin_lens),
            (new_fin, cand_seqs, torch.full_like(cand_token, length)),
        )

        keep_scores = cand_scores.masked_fill(is_eos, float("-inf"))
        live_scores, keep = keep_scores.topk(K, dim=-1)
        live_seqs = cand_seqs.gather(1, keep[..., None].expand(-1, -1, N))
        cache.reorder((row_offset + cand_beam.gather(1, keep)).view(-1))

        # Done when K hypotheses have finished and the best live one, scored at its current
        # length, is no better than the worst of them (HF's default stopping rule).
        best_live = live_scores[:, 0] / length**length_penalty
        done = done | ((fin_scores[:, -1] > float("-inf")) & (best_live <= fin_scores[:, -1]))
        if all_rows_done(done, sharded):
            break
        tokens = live_seqs[:, :, step].reshape(B * K, 1)

    # Sentences that ran out of steps also consider their unfinished live hypotheses.
    unfinished = torch.where(done[:, None], torch.full_like(live_scores, float("-inf")),
                             live_scores / length**length_penalty)
    fin_scores, fin_seqs, fin_lens = _keep_best(
        1, (fin_scores, fin_seqs, fin_lens),
        (unfinished, live_seqs, torch.full_like(fin_lens, length)),
    )
    width = int(fin_lens.max())
    return fin_seqs[:, 0, :width]


def _keep_best(
    k: int, old: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two pools of (scores [B, n], seqs [B, n, N], lengths [B, n]); keep the k best."""
    scores = torch.cat([old[0], new[0]], dim=1)
    seqs = torch.cat([old[1], new[1]], dim=1)
    lens = torch.cat([old[2], new[2]], dim=1)
    best, idx = scores.topk(k, dim=-1)
    return best, seqs.gather(1, idx[..., None].expand(-1, -1, seqs.shape[-1])), lens.gather(1, idx)
