"""Memory benchmarks (issue 3): policy hit ratios, scale, compression, data path."""
