"""Benchmarks against the code lmlab's users would otherwise write (`make bench`)."""
