"""LightningDataModules. Each builds the run's tokenizer and serves step-reproducible batches."""

from lmlab.data.base import LMDataModule
from lmlab.data.pairs import PairsDataModule, SyntheticTasksDataModule
from lmlab.data.text import TextCorpusDataModule

__all__ = ["LMDataModule", "PairsDataModule", "SyntheticTasksDataModule", "TextCorpusDataModule"]
