"""Callbacks Lightning lacks: crash-safe checkpoints, non-finite guard, throughput, memory."""

from lmlab.callbacks.checkpointing import AtomicModelCheckpoint, NonFiniteError, ResumeCheckpoint
from lmlab.callbacks.memory import MemoryMonitor
from lmlab.callbacks.nonfinite import NonFiniteGuard
from lmlab.callbacks.progress import ProgressBar
from lmlab.callbacks.step_profiler import StepProfiler
from lmlab.callbacks.throughput import ThroughputMonitor

__all__ = ["AtomicModelCheckpoint", "MemoryMonitor", "NonFiniteError", "NonFiniteGuard", "ProgressBar", "ResumeCheckpoint", "StepProfiler", "ThroughputMonitor"]
