"""UnigramTokenizer: a SentencePiece-style Unigram LM vocabulary trained with `tokenizers`.

Text handling is the same as bpe's ("▁" marks spaces and the start of the text, newlines are
pieces of their own), so both round-trip ordinary text alike; only the model differs: Unigram
keeps the `vocab_size` pieces that best explain the text under a unigram language model and
segments by the most probable split (Viterbi). With `alpha`, encoding for training samples a
segmentation from the lattice instead (subword regularisation, Kudo 2018).
"""

from __future__ import annotations

from tokenizers import Tokenizer as LibraryTokenizer
from tokenizers import models, trainers

from lmlab.tokenizers.base import UNK_ID, TextStream
from lmlab.tokenizers.bpe import SPACE_MARK, metaspace_pipeline
from lmlab.tokenizers.config import TokenizerConfig
from lmlab.tokenizers.fingerprint import text_stream
from lmlab.tokenizers.pipeline import TrainedPipelineTokenizer, vocab_too_small


class UnigramTokenizer(TrainedPipelineTokenizer):
    kind = "unigram"

    @classmethod
    def build_pipeline(
        cls, config: TokenizerConfig
    ) -> tuple[LibraryTokenizer, trainers.UnigramTrainer]:
        library = metaspace_pipeline(config, models.Unigram())
        specials = cls.special_strings(config)
        trainer = trainers.UnigramTrainer(
            vocab_size=config.vocab_size,
            special_tokens=specials,
            unk_token=specials[UNK_ID],
            show_progress=False,
        )
        return library, trainer

    @classmethod
    def train(cls, config: TokenizerConfig, texts: TextStream) -> UnigramTokenizer:
        try:
            return super().train(config, texts)
        except Exception as exc:  # the trainer raises a bare Exception when chars do not fit
            if "not large enough to contain all chars" not in str(exc):
                raise
            library, _ = cls.build_pipeline(config)
            alphabet: set[str] = set()
            for text in text_stream(texts)():
                alphabet.update(library.normalizer.normalize_str(text))
            raise vocab_too_small(
                config, len(alphabet), f"after normalisation, space as '{SPACE_MARK}'"
            ) from exc
