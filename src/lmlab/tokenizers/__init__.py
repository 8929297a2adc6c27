"""Tokenizers: one contract (base.Tokenizer), four kinds, trained once and cached per config + text.

from lmlab.tokenizers import build_tokenizer
tok = build_tokenizer({"kind": "bpe", "vocab_size": 4000}, texts, cache_dir=".cache")
ids = tok.encode("hello")          # no bos/eos added; specials are ids 0..5
tok.save(run_dir / "tokenizer")    # load_tokenizer(run_dir / "tokenizer") gives it back
"""

from lmlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from lmlab.tokenizers.bpe import BPETokenizer
from lmlab.tokenizers.build import build_tokenizer
from lmlab.tokenizers.byte import ByteTokenizer
from lmlab.tokenizers.char import CharTokenizer
from lmlab.tokenizers.config import TOKENIZER_KINDS, TokenizerConfig
from lmlab.tokenizers.fingerprint import text_fingerprint
from lmlab.tokenizers.registry import load_tokenizer
from lmlab.tokenizers.word import WordTokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "WordTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "text_fingerprint",
]
