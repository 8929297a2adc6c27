"""Decoder-only language model (GPT / Llama style), assembled from `layers/`.

One class covers GPT-2 (learned positions, LayerNorm, GELU, MHA), Llama-like models (RoPE,
RMSNorm, SwiGLU, GQA), MQA and ALiBi variants, mixtures of experts, Mamba and Jamba-like
hybrids of attention and Mamba layers: every choice is a `ModelConfig` field.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.models.backbone import Backbone, init_weights
from lmlab.models.cache import KVCache, LayerKVCache, LayerSSMCache
from lmlab.models.config import ModelConfig
from lmlab.models.layers.attention import MultiHeadAttention
from lmlab.models.layers.ffn import FeedForward, build_ffn
from lmlab.models.layers.fused_cross_entropy import head_cross_entropy
from lmlab.models.layers.mamba import MambaMixer
from lmlab.models.layers.mask import build_attention_mask, sliding_window_mask
from lmlab.models.layers.norm import build_norm
from lmlab.models.positions import PositionScheme, real_token_positions
from lmlab.models.soft_prompt import prepend_soft_prompt
from lmlab.precision import checkpoint_layer


class DecoderBlock(nn.Module):
    """Pre-LN block: x + mixer(norm(x)), then + ffn(norm(x)).

    The token mixer of layer `layer_index` (`config.layer_mixers`) is attention (`attn_norm`,
    `attn`) or Mamba (`mamba_norm`, `mamba`); its FFN is dense, MoE or absent (`build_ffn`).
    """

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.mixer_kind = config.layer_mixers[layer_index]
        if self.mixer_kind == "mamba":
            self.mamba_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.mamba = MambaMixer(
                config.d_model, config.d_state, config.d_conv, config.expand,
                config.ssm_dt_rank, bias=config.bias, chunk_size=config.ssm_chunk_size)
        else:
            self.attn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
            self.attn = MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.kv_heads,
                bias=config.bias,
                dropout=config.dropout,
                attn_impl=config.attn_impl,
                causal=True,
                qk_norm=config.qk_norm,
                norm_eps=config.norm_eps,
            )
        ffn = build_ffn(config, layer_index)
        if ffn is not None:
            self.ffn_norm = build_norm(config.norm, config.d_model, config.norm_eps)
        self.ffn = ffn
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def selects_rows(self) -> bool:
        """Whether `forward(..., output_rows=)` computes only those rows after the token mixer:
        attention (a Mamba scan's output projection is left as it is) with a dense FFN or none
        (a mixture of experts would route, drop and balance a different set of tokens)."""
        return self.mixer_kind != "mamba" and (self.ffn is None or isinstance(self.ffn, FeedForward))

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        kv_cache: LayerKVCache | LayerSSMCache | None = None,
        token_mask: Tensor | None = None,
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """kv_cache: this layer's slot of the model's cache (K/V or Mamba state).
        token_mask: [B, T], 1 for real tokens; Mamba and MoE keep pads out of their state.
        output_rows: [N] indices into the B·T positions (row-major): returns [N, d_model], the
        output projection, residual and FFN computed on those rows only (`selects_rows`)."""
        if output_rows is not None:
            if not self.selects_rows or kv_cache is not None:
                raise ValueError("output_rows needs an attention layer with a dense FFN or none "
                                 "and no KV cache (see DecoderBlock.selects_rows)")
            x = (x.flatten(0, 1).index_select(0, output_rows) + self.resid_dropout(
                self.attn(self.attn_norm(x), attn_mask, rotary, output_rows=output_rows)))
            return x if self.ffn is None else x + self.resid_dropout(self.ffn(self.ffn_norm(x)))
        if self.mixer_kind == "mamba":
            mixed = self.mamba(self.mamba_norm(x), token_mask, kv_cache)
        else:
            mixed = self.attn(self.attn_norm(x), attn_mask, rotary, kv_cache)
        x = x + self.resid_dropout(mixed)
        if self.ffn is None:
            return x
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x), token_mask))


class DecoderLM(Backbone, PositionScheme):
    """Causal LM: `forward(input_ids, attention_mask=None, cache=None) -> logits`.

    Logits span the padded vocabulary; ids >= `config.vocab_size` are padding that the
    tokenizer never produces (generation masks them out).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, d)
        self.init_positions(config, causal=True)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config.norm, d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_module("soft_prompt", None)  # prompt tuning installs one (soft_prompt.py)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) everywhere, residual projections scaled down.

        Each block adds two projections into the residual stream, so o_proj/down_proj (every
        expert's, Mamba's out_proj) get std / sqrt(2 * n_layers) to keep the stream's variance
        independent of depth. Mamba's SSM parameters then get their own init.
        """
        init_weights(self, self.config.init_std, [(self.layers, 2 * self.config.n_layers)])
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.reset_ssm_parameters()

    # Tasks may pass `labels` to `forward` and get the loss (see there), and `output_rows` to
    # `forward`/`hidden` for some positions' states only (task=classify's last-token pooling).
    accepts_labels = True
    accepts_output_rows = True

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        labels: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> logits [B, T, padded_vocab_size]; arguments as in `hidden`
        (with `output_rows`, logits [N, padded_vocab_size] and `labels` [N]).

        With `labels` [B, T] (already shifted: position t predicts labels[t]), the fp32
        cross-entropy instead (`reduction` "mean" over non-ignored labels, or "sum"), computed
        by `head_cross_entropy`, which never materialises the full logits when `lm_head` is a
        plain Linear (except compiled on a GPU, where inductor's fused full-logits form is
        faster: see `linear_cross_entropy`). Going through `forward` keeps module hooks (FSDP, DDP) and
        `torch.compile` of the backbone covering the loss too.
        """
        hidden = self.hidden(input_ids, attention_mask, cache, output_rows)
        if labels is None:
            return self.lm_head(hidden)
        return head_cross_entropy(hidden, self.lm_head, labels, ignore_index, label_smoothing,
                                  reduction)

    def hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, d_model] (lm_head's input).

        attention_mask: [B, past + T], 1/True for real tokens (covers cached tokens too).
            Pass None when nothing is padded: that keeps attention on the fused causal path.
            With a `soft_prompt` neither `past` nor the mask count the prompt; the model adds it.
        cache: a `new_cache(...)` object; the new keys/values are appended to it.
        output_rows: [N] indices into the B·T input positions (row-major): returns [N, d_model],
            those positions' states, the last layer computing only them after its attention
            (`DecoderBlock.selects_rows`; else every row, taken after).
        """
        h = self.embed_tokens(input_ids)
        take_input_positions = None  # set when prompt tuning inserts virtual tokens into h
        if self.soft_prompt is not None:
            h, attention_mask, take_input_positions = prepend_soft_prompt(
                self.soft_prompt, h, attention_mask, cache)
        B, T = h.shape[:2]
        past = cache.length if cache is not None else 0
        S = past + T
        self.check_lengths(B, T, S, attention_mask, cache,
                           f"a forward over {S} positions ({past} cached + {T} new)")

        key_positions = real_token_positions(attention_mask, S, input_ids.device)  # [B or 1, S]
        position_ids = key_positions[:, past:]
        h = self.embed_dropout(self.embed_positions(h, position_ids, S))

        rotary, bias = self.position_terms(position_ids, key_positions, S)
        window = None
        if self.config.sliding_window is not None and S > self.config.sliding_window:
            window = sliding_window_mask(position_ids, key_positions, self.config.sliding_window,
                                         self.config.global_tokens)
        attn_mask = build_attention_mask(T, S, attention_mask, causal=True, bias=bias,
                                         device=input_ids.device, window_mask=window)
        token_mask = attention_mask[:, past:] if attention_mask is not None else None

        last = len(self.layers) - 1
        rows_in_last = (output_rows is not None and cache is None and take_input_positions is None
                        and self.layers[last].selects_rows)
        if self.config.activation_checkpointing and cache is None and self.training and torch.is_grad_enabled():
            for i, layer in enumerate(self.layers):  # non-reentrant: see TransformerStack.forward
                h = checkpoint_layer(layer, h, attn_mask, rotary, None, token_mask,
                                     output_rows if rows_in_last and i == last else None)
        else:
            for i, layer in enumerate(self.layers):
                h = layer(h, attn_mask, rotary, cache.layers[i] if cache is not None else None,
                          token_mask, output_rows if rows_in_last and i == last else None)
        if cache is not None:
            cache.advance(T)
        if take_input_positions is not None:
            h = take_input_positions(h)
        if output_rows is not None and not rows_in_last:
            h = h.flatten(0, 1).index_select(0, output_rows)
        return self.norm(h)

    def output_row_modules(self) -> tuple[str, ...]:
        """Modules that run on `output_rows` only when they are given (FLOPs accounting)."""
        last = len(self.layers) - 1
        if self.soft_prompt is not None or not self.layers[last].selects_rows:
            return ()
        return (f"layers.{last}.attn.o_proj", f"layers.{last}.ffn")

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for `max_len` positions (prompt + generated tokens): K/V for the
        attention layers, a constant-size recurrent state for the Mamba layers."""
        weight = self.embed_tokens.weight
        config = self.config
        if self.soft_prompt is not None:
            max_len += self.soft_prompt.n_virtual_tokens  # the prompt is cached like tokens
        return KVCache(
            config.n_layers,
            batch_size,
            config.kv_heads,
            max_len,
            config.head_dim,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
            ssm_layers=[i for i, kind in enumerate(config.layer_mixers) if kind == "mamba"],
            ssm_dims=(config.d_inner, config.d_conv, config.d_state),
        )
