"""The backend Protocol: how one managed model is loaded, moved and unloaded.

The manager owns states, locks, retries, timeouts and accounting; a backend only does the work
and raises typed errors: ``BackendUnavailable`` (cannot reach it: no retry), ``BackendError`` /
``OperationTimeout`` (retried up to ``max_load_retries``), ``ModelNotInBackend`` (no retry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from vramancer.models.types import CPU, BackendKind


@dataclass(frozen=True, slots=True)
class Target:
    """Where to put a model.

    ``device`` is the accounting name (``cpu`` / ``cuda:N``, VRAMancer's index); ``runs_on``
    is where tensors really go (``cpu`` for a simulated GPU, ``cuda:K`` torch's index);
    ``cuda_index`` is what ``CUDA_VISIBLE_DEVICES`` / Ollama's ``main_gpu`` should name.
    """

    device: str
    runs_on: str
    simulated: bool = False
    cuda_index: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device != CPU

    @classmethod
    def cpu(cls) -> Target:
        return cls(CPU, CPU)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load or a move produced."""

    #: Memory measured on the GPU (torch parameters, Ollama's ``size_vram``); None: unknown.
    vram_bytes: int | None = None
    #: Size of the model however it is placed (Ollama's ``size``), for learning.
    size_bytes: int | None = None


class ModelBackend(Protocol):
    """One model's backend. Instances are per model; they may share a client."""

    kind: BackendKind
    #: Whether ``move`` works in place (torch); others are unloaded and loaded again.
    can_move: bool

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        """Load the model (or ``variant`` of it) on ``target``; return what it measured."""
        ...

    async def move(self, target: Target) -> LoadResult:
        """Move the loaded model to ``target`` (only when ``can_move``)."""
        ...

    async def unload(self) -> None:
        """Free the model's memory. Unloading a model that is not loaded succeeds."""
        ...

    def handle(self) -> Any:
        """The live object users work with (torch module, pipeline), or None."""
        ...

    async def close(self) -> None:
        """Release what the backend holds (clients, processes) at shutdown."""
        ...
