"""Small torch factories for the model-manager tests (fast, deterministic, no downloads)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch import nn

#: How many times each factory built a model (tests read it).
BUILDS: dict[str, int] = {}
_lock = threading.Lock()


def _count(name: str) -> None:
    with _lock:
        BUILDS[name] = BUILDS.get(name, 0) + 1


def tiny() -> nn.Module:
    """A 16 -> 8 linear layer with fixed weights."""
    _count("tiny")
    torch.manual_seed(0)
    return nn.Linear(16, 8)


def tiny_small() -> nn.Module:
    """A smaller variant of ``tiny``."""
    _count("tiny_small")
    torch.manual_seed(0)
    return nn.Linear(16, 2)


class Pipeline:
    """A pipeline object without ``.to()``: it wraps ``.model`` and must be re-initialised."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 4)
        self.device = torch.device("cpu")
        self.reinitialized = 0

    def reinitialize_pipeline(self) -> None:
        self.reinitialized += 1

    def __call__(self, x: torch.Tensor) -> Any:
        return self.model(x.to(self.device))


def pipeline() -> Pipeline:
    _count("pipeline")
    return Pipeline()


def with_device(device: str = "cpu") -> nn.Module:
    """A factory that takes the target device."""
    _count("with_device")
    return nn.Linear(2, 2).to(device)


def slow() -> nn.Module:
    """Takes 0.6 s to build: loads time out."""
    _count("slow")
    time.sleep(0.6)
    return nn.Linear(2, 2)


def broken() -> nn.Module:
    _count("broken")
    raise RuntimeError("weights are corrupt")


def not_a_model() -> object:
    return object()
