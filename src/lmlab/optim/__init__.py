"""Optimizer helpers and learning-rate schedules."""
