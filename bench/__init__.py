"""Benchmarks, importable from the repository root (``python -m bench.<area>.<name>``)."""
