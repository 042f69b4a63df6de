"""Benchmarks of the model manager (issue 4): orchestration overhead, profile switches, GPU."""
