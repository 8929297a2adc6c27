"""Encoder-decoder backbone: the original Transformer (Vaswani et al.) and T5 in one class.

A bidirectional encoder stack reads the source once; a causal decoder stack with
cross-attention predicts the target. Source and target share one embedding matrix, tied to
the output projection when `tie_embeddings` (so the source and target vocabularies are one
tokenizer's). Layout, for weight import:

    embed_tokens, lm_head,
    encoder.{pos_embed | relative_bias, embed_norm | norm, layers.{i}.{attn_norm, attn.*,
             ffn_norm, ffn.*}},
    decoder.{pos_embed | relative_bias, embed_norm | norm, layers.{i}.{attn_norm, attn.*,
             cross_norm, cross_attn.{q,k,v,o}_proj, ffn_norm, ffn.*}}
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.models.backbone import Backbone, init_weights
from lmlab.models.cache import KVCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.fused_cross_entropy import (
    REDUCTIONS,
    fusable_head,
    linear_cross_entropy,
    plain_cross_entropy,
)
from lmlab.models.soft_prompt import prepend_soft_prompt, widen_mask
from lmlab.models.stack import TransformerStack


class Seq2SeqCache:
    """Decoder state for incremental decoding.

    `self_attn` grows by one position per step; `memory_kv` (every layer's cross-attention
    keys/values) is filled by the first `decode` call and then only read, because the memory
    does not change during a generation.
    """

    def __init__(self, self_attn: KVCache):
        self.self_attn = self_attn
        self.memory_kv: list[tuple[Tensor, Tensor]] | None = None

    @property
    def length(self) -> int:
        return self.self_attn.length

    def reorder(self, index: Tensor) -> None:
        """Row i continues the hypothesis that was row index[i] (beam search).

        Only the self-attention cache moves: beam search permutes rows within the beams of
        one source sentence, which all hold the same memory keys/values.
        """
        n = self.self_attn.length
        for store in (self.self_attn.keys, self.self_attn.values):
            for layer_cache in store:
                layer_cache[:, :, :n] = layer_cache[:, :, :n].index_select(0, index)


def _unless_full(mask: Tensor | None) -> Tensor | None:
    """None for a CPU mask without padding, which is then no mask at all.

    Without a mask, positions are `arange` (the same as counted over real tokens when all
    are real), so the encoder's relative-position bias is one [1, H, S, S] table instead of
    a [B, H, S, S] one per row (8x less bias lookup, masking and gradient at batch 8) and
    cross-attention runs unmasked. The check reads the mask's values, so it is skipped where
    that costs a host-device synchronisation (GPU) or a graph break (torch.compile): there
    the mask is kept, which gives the same outputs.
    """
    if mask is None or mask.device.type != "cpu" or torch.compiler.is_compiling():
        return mask
    return None if bool(mask.all()) else mask


class EncoderDecoderModel(Backbone):
    """`forward(src_ids, src_mask, tgt_ids, cache=None) -> logits [B, T_tgt, padded_vocab]`.

    Targets are teacher-forced (`tgt_ids` = <bos> + target, right-padded); the decoder is
    causal, so right padding never reaches a real target token and needs no mask.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d = config.d_model
        n_dec = config.n_decoder_layers or config.n_layers
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, d)
        self.encoder = TransformerStack(config, config.n_layers, causal=False)
        self.decoder = TransformerStack(config, n_dec, causal=True, cross_attention=True)
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        # Prompt tuning's virtual tokens go in front of the source only (as in `peft`): the
        # decoder reads them through cross-attention, its own input stays the target.
        self.register_module("soft_prompt", None)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        init_weights(self, self.config.init_std,
                     [(s, s.n_residual_writes) for s in (self.encoder, self.decoder)])

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src_ids [B, S] (padded either side), src_mask 1 = real -> memory [B, S, d_model].

        With a `soft_prompt` the memory is [B, P + S, d_model] (the prompt's states included)
        and `decode` widens `src_mask` to match.
        """
        h = self.embed_tokens(src_ids)
        if self.soft_prompt is not None:
            h, src_mask, _ = prepend_soft_prompt(self.soft_prompt, h, src_mask)
        return self.encoder(h, src_mask)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor | None,
        src_mask: Tensor | None = None,
        cache: Seq2SeqCache | None = None,
        hidden_only: bool = False,
    ) -> Tensor:
        """tgt_ids [B, T] (the new target tokens when a cache holds the earlier ones) -> logits
        (`hidden_only`: the decoder's final hidden states, before `lm_head`).

        memory may be None once `cache` holds its projected keys/values.
        """
        if self.soft_prompt is not None:
            src_mask = widen_mask(src_mask, self.soft_prompt.n_virtual_tokens)
        if cache is not None and cache.memory_kv is not None:
            memory_kv = cache.memory_kv
        elif memory is None:
            raise ValueError("decode needs the encoder memory (or a cache that already has it)")
        else:
            memory_kv = self.decoder.project_memory(memory)
            if cache is not None:
                cache.memory_kv = memory_kv
        h = self.decoder(
            self.embed_tokens(tgt_ids),
            cache=cache.self_attn if cache is not None else None,
            memory_kv=memory_kv,
            memory_mask=src_mask,
        )
        return h if hidden_only else self.lm_head(h)

    # Tasks may pass `labels` to `forward` and get the loss (see there).
    accepts_labels = True

    def forward(
        self,
        src_ids: Tensor,
        src_mask: Tensor | None,
        tgt_ids: Tensor,
        cache: Seq2SeqCache | None = None,
        labels: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        loss_vocab: int | None = None,
    ) -> Tensor:
        """Logits [B, T, padded_vocab_size]; with `labels` [B, T] (the target shifted: position
        t predicts labels[t]) the fp32 cross-entropy instead, over the first `loss_vocab`
        logits only (None = all; ids that merely pad the vocabulary then get no probability
        or smoothing mass), computed by `linear_cross_entropy` when `lm_head` is a plain Linear:
        without the full logits, except compiled on a GPU (see `fused_cross_entropy`)."""
        src_mask = _unless_full(src_mask)
        memory = None
        if cache is None or cache.memory_kv is None:
            memory = self.encode(src_ids, src_mask)
        if labels is None:
            return self.decode(tgt_ids, memory, src_mask, cache)
        hidden = self.decode(tgt_ids, memory, src_mask, cache, hidden_only=True)
        if fusable_head(self.lm_head) and reduction in REDUCTIONS:
            return linear_cross_entropy(hidden, self.lm_head.weight[:loss_vocab], labels,
                                        ignore_index, label_smoothing, reduction)
        return plain_cross_entropy(self.lm_head(hidden)[..., :loss_vocab], labels, ignore_index,
                                   label_smoothing, reduction)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Seq2SeqCache:
        """An empty decoder cache for `max_len` target positions (<bos> included)."""
        weight = self.embed_tokens.weight
        return Seq2SeqCache(self.decoder.new_cache(
            batch_size, max_len,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        ))
