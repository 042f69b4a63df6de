"""Benchmarks of the task scheduler (issue 5)."""
