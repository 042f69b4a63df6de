"""Memory benchmarks: policy hit ratios, scale, compression, data path."""
