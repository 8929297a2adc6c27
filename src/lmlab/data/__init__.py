"""LightningDataModules. Each builds the run's tokenizer and serves step-reproducible batches."""

from lmlab.data.base import LMDataModule
from lmlab.data.classification import ClassificationDataModule
from lmlab.data.pairs import PairsDataModule, SyntheticTasksDataModule
from lmlab.data.parallel import ParallelTextDataModule
from lmlab.data.text import TextCorpusDataModule

__all__ = [
    "ClassificationDataModule",
    "LMDataModule",
    "PairsDataModule",
    "ParallelTextDataModule",
    "SyntheticTasksDataModule",
    "TextCorpusDataModule",
]
