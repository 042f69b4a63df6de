"""The release agent: a git branch -> candidate -> build and tests -> accept or reject ->
an atomic switch of ``current`` (see docs/release.md)."""
