"""A stack of `TransformerLayer`s with its position scheme: the encoder and decoder halves.

`EncoderModel` is one bidirectional stack; `EncoderDecoderModel` is a bidirectional stack plus
a causal stack with cross-attention. The stack takes token embeddings (the models own the
embedding matrix, so source and target can share it) and returns hidden states. Positions
are counted over real tokens, as in `DecoderLM`, so padding on either side changes nothing
for the real tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.models.cache import KVCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.mask import build_attention_mask, sliding_window_mask
from lmlab.models.layers.norm import build_norm
from lmlab.models.positions import PositionScheme, real_token_positions
from lmlab.models.transformer_layer import TransformerLayer
from lmlab.precision import checkpoint_layer


class TransformerStack(PositionScheme):
    """Positions + `n_layers` blocks + the stack's norm.

    Pre-LN stacks end with `norm` (the residual stream is never normalised otherwise);
    post-LN stacks already end every block in a norm and instead normalise the embeddings
    (`embed_norm`, as BERT does), which keeps the first block's input at unit scale.
    """

    def __init__(self, config: ModelConfig, n_layers: int, causal: bool,
                 cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.causal = causal
        d = config.d_model
        self.init_positions(config, causal)
        self.post_norm = config.norm_position == "post"
        if self.post_norm:
            self.embed_norm = build_norm(config.norm, d, config.norm_eps)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(config, causal, cross_attention, layer_index=i)
            for i in range(n_layers)
        )
        if not self.post_norm:
            self.norm = build_norm(config.norm, d, config.norm_eps)

    def forward(
        self,
        h: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        memory_kv: list[tuple[Tensor, Tensor]] | None = None,
        memory_mask: Tensor | None = None,
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """h: token embeddings [B, T, d_model] -> hidden states [B, T, d_model].

        attention_mask: [B, past + T], 1 for this stack's real tokens; None = no padding.
        cache: the self-attention KV cache (causal stacks), extended by T positions.
        memory_kv: per layer, the cross-attention keys/values from `project_memory`.
        memory_mask: [B, S_src], 1 for real source tokens; None = no source padding.
        output_rows: [N] indices into the B·T positions (row-major): returns [N, d_model],
            the states of those positions only. The last layer then computes only them after
            its attention (`TransformerLayer.selects_rows`): mlm needs the ~15 % masked
            positions' states, and the last layer's FFN and output projection are ~1/8 of a
            6-layer encoder's work.
        """
        B, T, _ = h.shape
        past = cache.length if cache is not None else 0
        S = past + T
        self.check_lengths(B, T, S, attention_mask, cache, f"a sequence of {S} positions")

        key_positions = real_token_positions(attention_mask, S, h.device)  # [B or 1, S]
        position_ids = key_positions[:, past:]
        h = self.embed_positions(h, position_ids, S)
        if self.post_norm:
            h = self.embed_norm(h)
        h = self.embed_dropout(h)

        rotary, bias = self.position_terms(position_ids, key_positions, S)
        window = None
        if self.config.sliding_window is not None:
            window = sliding_window_mask(position_ids, key_positions, self.config.sliding_window,
                                         self.config.global_tokens, causal=self.causal)
        attn_mask = build_attention_mask(T, S, attention_mask, causal=self.causal, bias=bias,
                                         device=h.device, window_mask=window)
        cross_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        token_mask = attention_mask[:, past:] if attention_mask is not None else None

        last = len(self.layers) - 1
        rows_in_last = (output_rows is not None and cache is None and last >= 0
                        and self.layers[last].selects_rows)
        if self.config.activation_checkpointing and cache is None and self.training and torch.is_grad_enabled():
            # Recompute each layer in backward. Non-reentrant: MoE auxiliary losses (computed
            # inside a layer, not returned) still get gradients; dropout masks are replayed
            # from the saved RNG state, so gradients equal the plain path's.
            for i, layer in enumerate(self.layers):
                h = checkpoint_layer(layer, h, attn_mask, rotary, None,
                                     memory_kv[i] if memory_kv is not None else None, cross_mask,
                                     token_mask, output_rows if rows_in_last and i == last else None)
        else:
            for i, layer in enumerate(self.layers):
                h = layer(
                    h, attn_mask, rotary,
                    kv_cache=cache.layers[i] if cache is not None else None,
                    memory_kv=memory_kv[i] if memory_kv is not None else None,
                    memory_mask=cross_mask,
                    token_mask=token_mask,
                    output_rows=output_rows if rows_in_last and i == last else None,
                )
        if cache is not None:
            cache.advance(T)
        if output_rows is not None and not rows_in_last:
            h = h.flatten(0, 1).index_select(0, output_rows)
        return h if self.post_norm else self.norm(h)

    def output_row_modules(self) -> tuple[str, ...]:
        """Names (relative to the stack) of the modules that run on `output_rows` only when
        they are given: the last layer's output projection and FFN (FLOPs accounting)."""
        last = len(self.layers) - 1
        if last < 0 or not self.layers[last].selects_rows:
            return ()
        return (f"layers.{last}.attn.o_proj", f"layers.{last}.ffn")

    def project_memory(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every layer, computed once per source batch."""
        return [layer.cross_attn.project_memory(memory) for layer in self.layers]

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None,
                  dtype: torch.dtype | None) -> KVCache:
        return KVCache(len(self.layers), batch_size, self.config.kv_heads, max_len,
                       self.config.head_dim, device=device, dtype=dtype)

    @property
    def n_residual_writes(self) -> int:
        return sum(layer.n_residual_writes for layer in self.layers)

