"""WordTokenizer: words, numbers and single punctuation marks as tokens; rare ones become <unk>."""

from __future__ import annotations

from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as LibraryTokenizer

from lmlab.tokenizers.base import SPECIAL_TOKENS, UNK_ID
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.pipeline import PipelineTokenizer

# `\w` is the Unicode word class of the library's regex engine (letters, combining marks,
# digits, underscore), so Devanagari or Thai words with vowel signs stay whole. Each
# punctuation mark is its own token: "2:" -> "2", ":" and "..." -> ".", ".", ".".
WORD_PATTERN = r"\w+|[^\w\s]"


class WordTokenizer(PipelineTokenizer):
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
        library = LibraryTokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[UNK_ID]))
        if config.lowercase:
            library.normalizer = normalizers.Lowercase()
        # invert=True keeps the matches and drops what lies between them (the whitespace).
        library.pre_tokenizer = pre_tokenizers.Split(
            Regex(WORD_PATTERN), behavior="removed", invert=True
        )
        trainer = trainers.WordLevelTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        return library, trainer
