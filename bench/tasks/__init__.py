"""Benchmarks of the task scheduler."""
