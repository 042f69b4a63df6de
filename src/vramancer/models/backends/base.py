"""The backend Protocol: how one managed model is loaded, moved and unloaded.

The manager owns states, locks, retries, timeouts and accounting; a backend only does the work
and raises typed errors: ``BackendUnavailable`` (cannot reach it: no retry), ``BackendError`` /
``OperationTimeout`` (retried up to ``max_load_retries``), ``ModelNotInBackend`` (no retry).
"""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True, slots=True)
class RunningModel:
    """A model an external server reports loaded (one entry of Ollama's ``GET /api/ps``)."""

    name: str
    model: str
    size_bytes: int
    size_vram_bytes: int
    expires_at: str | None = None

    def is_model(self, name: str) -> bool:
        """Whether this entry is ``name`` (``llama3`` and ``llama3:latest`` are one model)."""
        wanted = full_name(name)
        return wanted in (full_name(self.name), full_name(self.model))


def full_name(name: str) -> str:
    """Ollama's name for a model: ``:latest`` when the name has no tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a caller of ``use()`` needs to send requests to the model itself (all None for a
    model used in-process)."""

    #: Where to send requests (Ollama's endpoint).
    endpoint: str | None = None
    #: The model to name in requests (the smaller variant's tag while it is active).
    model: str | None = None
    #: The ``keep_alive`` to send with requests.
    keep_alive: str | int | None = None


class BackendService(Protocol):
    """An external server shared by the models of one backend (Ollama). Its models outlive the
    manager (they stay loaded at shutdown unless ``unload_on_stop``); it is probed every
    ``retry_interval_s``, and while it is unreachable the manager is in degraded mode under
    its ``name``."""

    name: str

    @property
    def retry_interval_s(self) -> float: ...

    async def probe(self) -> list[RunningModel]:
        """Check reachability and list what the server has loaded; raises
        ``BackendUnavailable`` (or another ``VramancerError``) when it cannot tell."""
        ...

    async def aclose(self) -> None: ...


class ModelBackend(Protocol):
    """One model's backend. Instances are per model; they may share a client."""

    kind: BackendKind
    #: Whether ``move`` works in place (torch); others are unloaded and loaded again.
    can_move: bool
    #: Whether the model, once preempted off its GPU (and unloaded, as it cannot move), is
    #: loaded again on the CPU when the CPU is allowed (Ollama: ``num_gpu: 0``).
    reload_on_cpu: bool

    @property
    def service(self) -> BackendService | None:
        """The external server holding the model, or None when the manager's process (or a
        child process of it) holds it."""
        ...

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

    def request_info(self) -> RequestInfo:
        """Where and how ``use()`` callers send requests to the model."""
        ...

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        """This model's entry among what ``service.probe()`` listed (None: not loaded there)."""
        ...

    async def estimate_vram(self) -> int | None:
        """What the model should take before it was ever loaded; None when unknown."""
        ...

    async def close(self) -> None:
        """Release what the backend holds (clients, processes) at shutdown."""
        ...
