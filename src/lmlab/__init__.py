"""lmlab: compose language-model experiments from config groups."""

from lmlab.errors import ConfigError, DataError, LmlabError

__all__ = ["ConfigError", "DataError", "LmlabError"]
__version__ = "0.1.0"
