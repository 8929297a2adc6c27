"""Tokenizers: one contract (base.Tokenizer), nine kinds, trained once and cached per config + text.

from lmlab.tokenizers import build_tokenizer
tok = build_tokenizer({"kind": "bpe", "vocab_size": 4000}, texts, cache_dir=".cache")
ids = tok.encode("hello")          # no bos/eos added; specials are ids 0..5
ids = tok.encode("hello", training=True)  # sampled (BPE-dropout, StochasTok...) if configured
arr = tok.encode_to_array(corpus, np.uint16)  # a whole corpus, parallel, == encode(corpus)
tok.save(run_dir / "tokenizer")    # load_tokenizer(run_dir / "tokenizer") gives it back
tokenizer_metrics(tok, lines)      # fertility, bytes/token, unk rate, round-trip rate, ...
"""

from lmlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from lmlab.tokenizers.bpe import BPETokenizer
from lmlab.tokenizers.build import build_tokenizer
from lmlab.tokenizers.byte import ByteTokenizer
from lmlab.tokenizers.bytelevel_bpe import ByteLevelBPETokenizer
from lmlab.tokenizers.char import CharTokenizer
from lmlab.tokenizers.compat import check_fits_embedding
from lmlab.tokenizers.config import TOKENIZER_KINDS, TokenizerConfig
from lmlab.tokenizers.fingerprint import text_fingerprint
from lmlab.tokenizers.hf import HFTokenizer
from lmlab.tokenizers.metrics import METRIC_NAMES, tokenizer_metrics
from lmlab.tokenizers.registry import load_tokenizer
from lmlab.tokenizers.sentencepiece import SentencePieceTokenizer
from lmlab.tokenizers.unigram import UnigramTokenizer
from lmlab.tokenizers.word import WordTokenizer
from lmlab.tokenizers.wordpiece import WordPieceTokenizer

__all__ = [
    "METRIC_NAMES",
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteLevelBPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "UnigramTokenizer",
    "WordPieceTokenizer",
    "WordTokenizer",
    "build_tokenizer",
    "check_fits_embedding",
    "load_tokenizer",
    "text_fingerprint",
    "tokenizer_metrics",
]
