"""BPETokenizer: byte-pair-encoding subwords trained with the `tokenizers` library.

Pipeline (chosen so ordinary text round-trips exactly, spaces and newlines included):
  normalizer     NFKC (+ Lowercase), then one "▁" prepended to the whole text
  pre-tokenizer  runs of newlines isolated; spaces become "▁" and start a new piece
  model          BPE with <unk> for characters outside the training alphabet
  decoder        "▁" -> space, dropping the one prepended to the first token

Prepending "▁" unconditionally (rather than Metaspace's own "prepend unless the text already
starts with ▁") is what keeps a leading space: " x" -> "▁▁x" -> " x". Because every "▁" starts a
new piece, no token holds more than one, at its start, so dropping the first token's "▁" drops
exactly the prepended one.

What decode(encode(text)) does not give back exactly:
  * NFKC-changed characters come back normalised ("ﬁ" -> "fi", full-width "Ａ" -> "A"), and
    lowercased when `lowercase` is set;
  * characters absent from the training text become <unk>, which decode drops by default;
  * a literal "▁" (U+2581) in the text comes back as a space;
  * decoding a sequence that does not start at the beginning of a text (a continuation) drops
    the leading space of its first token.
"""

from __future__ import annotations

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as LibraryTokenizer

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import SPECIAL_TOKENS, UNK_ID, TextStream
from lmlab.tokenizers.config import NUM_SPECIAL_TOKENS, TokenizerConfig
from lmlab.tokenizers.pipeline import PipelineTokenizer

SPACE_MARK = "▁"


class BPETokenizer(PipelineTokenizer):
    kind = "bpe"

    @classmethod
    def build_pipeline(
        cls, config: TokenizerConfig
    ) -> tuple[LibraryTokenizer, trainers.BpeTrainer]:
        library = LibraryTokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
        steps = [normalizers.NFKC()]
        if config.lowercase:
            steps.append(normalizers.Lowercase())
        steps.append(normalizers.Prepend(SPACE_MARK))
        library.normalizer = normalizers.Sequence(steps)
        library.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
                pre_tokenizers.Metaspace(
                    replacement=SPACE_MARK, prepend_scheme="never", split=True
                ),
            ]
        )
        library.decoder = decoders.Metaspace(
            replacement=SPACE_MARK, prepend_scheme="always", split=True
        )
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        return library, trainer

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> BPETokenizer:
        tokenizer = super().train(config, texts)
        # The trainer keeps every character of the text even past vocab_size, so a too-small
        # vocab_size shows up only now, as a vocabulary larger than asked for.
        if tokenizer.vocab_size > config.vocab_size:
            alphabet = sum(1 for tok in tokenizer.vocab[NUM_SPECIAL_TOKENS:] if len(tok) == 1)
            raise ConfigError(
                "tokenizer.vocab_size",
                config.vocab_size,
                f"an integer >= {alphabet + NUM_SPECIAL_TOKENS}",
                f"the training text has an alphabet of {alphabet} characters (after normalisation, "
                f"space as '{SPACE_MARK}'); bpe needs room for them plus the "
                f"{NUM_SPECIAL_TOKENS} special tokens",
            )
        return tokenizer
