"""T5 bucketed relative position bias (Raffel et al. 2020).

Each head learns one scalar per bucket of relative distance `key_pos - query_pos`, added to
the attention scores. Near distances get a bucket each, far ones share logarithmically wider
buckets up to `max_distance`; bidirectional attention (encoder) splits the buckets between
keys before and after the query, causal attention (decoder) only looks back. As in T5, one
bias table per stack is computed once per forward (in "the first layer") and shared by every
layer of that stack.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_position_bucket(
    relative_position: Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """Map `key_pos - query_pos` (any integer tensor) to bucket ids in [0, num_buckets).

    The same function as Mesh TensorFlow's / HF's `T5Attention._relative_position_bucket`,
    so imported T5 weights see the same buckets.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys after the query are never attended

    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only keeps log(0) = -inf out of the discarded branch of the `where`.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact)
    if_large = max_exact + (
        log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    if_large = if_large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, if_large)


class RelativePositionBias(nn.Embedding):
    """The [num_buckets, n_heads] table of learned biases (HF: `relative_attention_bias`).

    An `nn.Embedding` so the weight maps one-to-one onto T5's and is initialised like every
    other embedding; `forward` takes positions instead of ids.
    """

    def __init__(self, num_buckets: int, n_heads: int, max_distance: int, bidirectional: bool):
        super().__init__(num_buckets, n_heads)
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:  # type: ignore[override]
        """q_pos [B, T] (or [1, T]), k_pos [B, S] (or [1, S]) -> additive bias [B, H, T, S]."""
        relative = k_pos[..., None, :] - q_pos[..., :, None]
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_embeddings, self.max_distance
        )
        return super().forward(buckets).permute(0, 3, 1, 2)
