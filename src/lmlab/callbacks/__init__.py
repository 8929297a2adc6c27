"""Callbacks Lightning lacks: crash-safe checkpoints, non-finite guard, throughput."""

from lmlab.callbacks.checkpointing import AtomicModelCheckpoint, NonFiniteError, ResumeCheckpoint
from lmlab.callbacks.nonfinite import NonFiniteGuard
from lmlab.callbacks.throughput import ThroughputMonitor

__all__ = ["AtomicModelCheckpoint", "NonFiniteError", "NonFiniteGuard", "ResumeCheckpoint", "ThroughputMonitor"]
