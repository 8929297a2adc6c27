"""BPETokenizer: byte-pair-encoding subwords trained with the `tokenizers` library.

Pipeline (chosen so ordinary text round-trips exactly, spaces and newlines included):
  normalizer     NFKC by default (`normalization`), `lowercase`, then one "▁" prepended
  pre-tokenizer  runs of newlines isolated; a literal special ("<eos>") cut apart; digit groups
                 isolated (`digits`); spaces become "▁" and start a new piece
  model          BPE with <unk> for characters outside the training alphabet; `dropout` > 0
                 samples BPE-dropout segmentations when encoding for training
  decoder        "▁" -> space, dropping the one prepended to the first token

Prepending "▁" unconditionally (rather than Metaspace's own "prepend unless the text already
starts with ▁") is what keeps a leading space: " x" -> "▁▁x" -> " x". Because every "▁" starts a
new piece, no token holds more than one, at its start, so dropping the first token's "▁" drops
exactly the prepended one.

What decode(encode(text)) does not give back exactly:
  * normalised characters come back normalised ("ﬁ" -> "fi", full-width "Ａ" -> "A"), and
    lowercased when `lowercase` is set;
  * characters absent from the training text become <unk>, which decode drops by default;
  * a literal "▁" (U+2581) in the text comes back as a space;
  * decoding a sequence that does not start at the beginning of a text (a continuation) drops
    the leading space of its first token.
"""

from __future__ import annotations

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as LibraryTokenizer

from lmlab.tokenizers.base import SPECIAL_TOKENS, UNK_ID, TextStream
from lmlab.tokenizers.components import digit_splitter, normalizer, sequence, special_guard
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.pipeline import TrainedPipelineTokenizer, vocab_too_small

SPACE_MARK = "▁"


def metaspace_pipeline(config: TokenizerConfig, model: models.Model) -> LibraryTokenizer:
    """The SentencePiece-like text handling shared by bpe and unigram (see the module doc)."""
    library = LibraryTokenizer(model)
    library.normalizer = normalizer(config, after=[normalizers.Prepend(SPACE_MARK)])
    library.pre_tokenizer = sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            *special_guard([*SPECIAL_TOKENS, *config.special_tokens]),
            *digit_splitter(config),
            pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=True),
        ]
    )
    library.decoder = decoders.Metaspace(
        replacement=SPACE_MARK, prepend_scheme="always", split=True
    )
    return library


def single_characters(vocab: list[str], skip: int) -> int:
    return sum(1 for tok in vocab[skip:] if len(tok) == 1)


class BPETokenizer(TrainedPipelineTokenizer):
    kind = "bpe"

    @classmethod
    def build_pipeline(
        cls, config: TokenizerConfig
    ) -> tuple[LibraryTokenizer, trainers.BpeTrainer]:
        specials = cls.special_strings(config)
        library = metaspace_pipeline(config, models.BPE(unk_token=specials[UNK_ID]))
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
        return library, trainer

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> BPETokenizer:
        tokenizer = super().train(config, texts)
        # The trainer keeps every character of the text even past vocab_size, so a too-small
        # vocab_size shows up only now, as a vocabulary larger than asked for.
        if tokenizer.vocab_size > config.vocab_size:
            alphabet = single_characters(tokenizer.vocab, config.num_special_tokens)
            raise vocab_too_small(config, alphabet, f"after normalisation, space as '{SPACE_MARK}'")
        return tokenizer
