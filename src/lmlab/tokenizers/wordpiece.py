"""WordPieceTokenizer: BERT-style WordPiece trained with the `tokenizers` library.

Text is split at whitespace and punctuation (and around CJK characters, as BERT does); each word
is segmented greedily longest-match-first into a word-initial piece and "##"-prefixed
continuation pieces. A word that cannot be segmented becomes one <unk>.

Decoding joins words with single spaces and re-attaches punctuation where BERT's cleanup rule
does ("a , b" -> "a, b"), so whitespace and some spacing around punctuation are not kept; with
`digits` other than keep, digit groups are separate words and decode with spaces between them
("1234" -> "123 4"). This kind is for encoders and comparisons, not for lossless generation.
"""

from __future__ import annotations

from tokenizers import Tokenizer as LibraryTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lmlab.tokenizers.base import UNK_ID, TextStream
from lmlab.tokenizers.bpe import single_characters
from lmlab.tokenizers.components import digit_splitter, normalizer, sequence
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.pipeline import TrainedPipelineTokenizer, vocab_too_small

CONTINUATION = "##"


class WordPieceTokenizer(TrainedPipelineTokenizer):
    kind = "wordpiece"

    @classmethod
    def build_pipeline(
        cls, config: TokenizerConfig
    ) -> tuple[LibraryTokenizer, trainers.WordPieceTrainer]:
        specials = cls.special_strings(config)
        library = LibraryTokenizer(
            models.WordPiece(unk_token=specials[UNK_ID], continuing_subword_prefix=CONTINUATION)
        )
        # BERT's own normaliser only for what it does beyond the config's options: control
        # characters out, spaces around CJK ideographs (so each is a word).
        bert = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        library.normalizer = normalizer(config, after=[bert])
        library.pre_tokenizer = sequence(
            [pre_tokenizers.BertPreTokenizer(), *digit_splitter(config)]
        )
        library.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=True)
        trainer = trainers.WordPieceTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=specials,
            continuing_subword_prefix=CONTINUATION,
            show_progress=False,
        )
        return library, trainer

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> WordPieceTokenizer:
        tokenizer = super().train(config, texts)
        if tokenizer.vocab_size > config.vocab_size:
            # Each character is needed twice: word-initial and as a "##" continuation.
            n = config.num_special_tokens
            alphabet = single_characters(tokenizer.vocab, n)
            continuations = sum(
                1 for t in tokenizer.vocab[n:] if t.startswith(CONTINUATION) and len(t) == 3
            )
            raise vocab_too_small(
                config,
                alphabet + continuations,
                f"{alphabet} word-initial and {continuations} '{CONTINUATION}' continuations",
            )
        return tokenizer
