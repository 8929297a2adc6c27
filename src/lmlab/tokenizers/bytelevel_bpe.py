"""ByteLevelBPETokenizer: GPT-2-style byte-level BPE, lossless on any text.

Text is read as UTF-8 bytes, each byte shown as a printable character (space as "Ġ"); GPT-2's
pre-tokenizer regex splits words, numbers, punctuation and whitespace, and BPE merges bytes
within those pieces. Every byte is in the base alphabet, so there is no <unk> and
decode(encode(text)) == text for any text (unless `normalization`/`lowercase` are set).
"""

from __future__ import annotations

from tokenizers import Tokenizer as LibraryTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab.tokenizers.components import digit_splitter, normalizer, sequence
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.pipeline import TrainedPipelineTokenizer


class ByteLevelBPETokenizer(TrainedPipelineTokenizer):
    kind = "bytelevel_bpe"

    @classmethod
    def build_pipeline(
        cls, config: TokenizerConfig
    ) -> tuple[LibraryTokenizer, trainers.BpeTrainer]:
        library = LibraryTokenizer(models.BPE())
        library.normalizer = normalizer(config)
        # Digit groups are isolated before the byte mapping, which would otherwise glue a
        # preceding space to the number (" 123").
        library.pre_tokenizer = sequence(
            [
                *digit_splitter(config),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        library.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=cls.special_strings(config),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        return library, trainer
