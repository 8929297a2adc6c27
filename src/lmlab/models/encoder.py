"""Encoder-only backbone (BERT style): bidirectional self-attention over padded batches.

`forward(input_ids, attention_mask) -> hidden` is what every encoder task consumes (MLM,
classification); `mlm_logits(hidden)` is the masked-LM head. Layout, for weight import:

    embed_tokens, encoder.pos_embed, encoder.embed_norm (post-LN) | encoder.norm (pre-LN),
    encoder.layers.{i}.{attn_norm, attn.{q,k,v,o}_proj, ffn_norm, ffn.{up,gate,down}_proj},
    mlm_transform.{dense, norm}, lm_head (weight tied to embed_tokens, own bias)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.backbone import Backbone, init_weights
from lmlab.models.config import ModelConfig
from lmlab.models.layers.norm import build_norm
from lmlab.models.soft_prompt import prepend_soft_prompt
from lmlab.models.stack import TransformerStack


class MLMTransform(nn.Module):
    """BERT's prediction-head transform: norm(gelu(dense(h))), before the tied output layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.norm = build_norm(config.norm, config.d_model, config.norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(h)))


class EncoderModel(Backbone):
    """`forward(input_ids, attention_mask=None) -> hidden [B, T, d_model]`.

    attention_mask is 1 for real tokens: pads are never attended to, so a real token's output
    is the same whatever the padding. Pad positions get finite but meaningless outputs.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, d)
        self.encoder = TransformerStack(config, config.n_layers, causal=False)
        self.mlm_transform = MLMTransform(config) if config.mlm_head else None
        # The output bias is per-token prior that a tied weight cannot express (BERT has one).
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=config.bias)
        self.register_module("soft_prompt", None)  # prompt tuning installs one (soft_prompt.py)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        init_weights(self, self.config.init_std, [(self.encoder, self.encoder.n_residual_writes)])

    # `forward(..., output_rows=)`: the task can ask for some positions' states only.
    accepts_output_rows = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                output_rows: Tensor | None = None) -> Tensor:
        """output_rows: [N] indices into the B·T input positions (row-major): returns [N,
        d_model], those positions' states, the last layer computing only them after its
        attention (`TransformerStack.forward`)."""
        h = self.embed_tokens(input_ids)
        if self.soft_prompt is None:
            return self.encoder(h, attention_mask, output_rows=output_rows)
        # The virtual tokens' states are dropped: heads see the input's positions only.
        h, attention_mask, take_input_positions = prepend_soft_prompt(self.soft_prompt, h,
                                                                      attention_mask)
        hidden = take_input_positions(self.encoder(h, attention_mask))
        return hidden if output_rows is None else hidden.flatten(0, 1).index_select(0, output_rows)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               output_rows: Tensor | None = None) -> Tensor:
        """Same as `forward`: the name every backbone shares for pooling heads."""
        return self(input_ids, attention_mask, output_rows)

    def output_row_modules(self) -> tuple[str, ...]:
        """Modules that run on `output_rows` only when they are given (FLOPs accounting)."""
        if self.soft_prompt is not None:
            return ()
        return tuple(f"encoder.{name}" for name in self.encoder.output_row_modules())

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, T, d_model] (or any [..., d_model]) -> logits [..., padded_vocab_size].

        Pass only the masked positions' hidden states to skip the vocabulary projection for
        the other 85%.
        """
        if self.mlm_transform is not None:
            hidden = self.mlm_transform(hidden)
        return self.lm_head(hidden)
