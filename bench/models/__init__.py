"""Benchmarks of the model manager: orchestration overhead, profile switches, GPU."""
