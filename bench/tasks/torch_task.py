"""The task of ``bench.tasks.warm``, in a module of its own so that loading it costs nothing
beyond what it imports itself."""

from __future__ import annotations


def uses_torch() -> float:
    """What a small GPU job's Python does first (import torch), then a little work."""
    import torch

    return float(torch.arange(10.0).sum())
