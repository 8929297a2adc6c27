"""Callbacks Lightning lacks."""

from lmlab.callbacks.throughput import ThroughputMonitor

__all__ = ["ThroughputMonitor"]
