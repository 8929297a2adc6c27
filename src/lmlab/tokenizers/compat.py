"""Whether a tokenizer can drive a given backbone: its ids must index the embedding."""

from __future__ import annotations

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import Tokenizer


def check_fits_embedding(tokenizer: Tokenizer, embedding_rows: int, source: str) -> None:
    """Raise ConfigError before any compute if the tokenizer has ids the embedding lacks.

    `embedding_rows` is the (padded) number of rows of the backbone's input embedding, e.g.
    from a checkpoint's weights; `source` names where the backbone comes from, for the message.
    A smaller vocabulary fits (its ids are a prefix), though only the checkpoint's own tokenizer
    gives its ids the meaning the weights learned.
    """
    if tokenizer.vocab_size > embedding_rows:
        raise ConfigError(
            "tokenizer",
            f"kind={tokenizer.kind} with {tokenizer.vocab_size} tokens",
            f"a tokenizer of at most {embedding_rows} tokens, such as the one saved with "
            f"{source} (leave tokenizer= unset)",
            f"its ids do not fit the {embedding_rows}-row embedding of {source}",
        )
