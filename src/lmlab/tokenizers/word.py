"""WordTokenizer: words, numbers and single punctuation marks as tokens; rare ones become <unk>."""

from __future__ import annotations

from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as LibraryTokenizer

from lmlab.tokenizers.base import UNK_ID
from lmlab.tokenizers.components import digit_splitter, normalizer, sequence
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.pipeline import TrainedPipelineTokenizer

# `\w` is the Unicode word class of the library's regex engine (letters, combining marks,
# digits, underscore), so Devanagari or Thai words with vowel signs stay whole. Each
# punctuation mark is its own token: "2:" -> "2", ":" and "..." -> ".", ".", ".".
WORD_PATTERN = r"\w+|[^\w\s]"


class WordTokenizer(TrainedPipelineTokenizer):
    """Word-level vocabulary of the `vocab_size - 6` most frequent tokens seen at least
    `min_frequency` times; ties are broken by the token string, so training is deterministic.

    Decoding joins tokens with single spaces: whitespace is not recorded, so
    decode(encode("add 2: 8 13 2 5")) == "add 2 : 8 13 2 5", and newlines become spaces.
    """

    kind = "word"

    @classmethod
    def build_pipeline(
        cls, config: TokenizerConfig
    ) -> tuple[LibraryTokenizer, trainers.WordLevelTrainer]:
        specials = cls.special_strings(config)
        library = LibraryTokenizer(models.WordLevel(unk_token=specials[UNK_ID]))
        library.normalizer = normalizer(config)
        # invert=True keeps the matches and drops what lies between them (the whitespace).
        library.pre_tokenizer = sequence(
            [
                *digit_splitter(config),
                pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            ]
        )
        trainer = trainers.WordLevelTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
        return library, trainer
