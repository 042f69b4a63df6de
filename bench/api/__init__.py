"""Benchmarks of the HTTP API and the daemon's idle cost."""
