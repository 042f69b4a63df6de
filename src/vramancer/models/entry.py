"""One managed model's mutable record, and the per-model values derived from its spec and the
``[gpu_manager]`` defaults (timeouts, retries, workload type)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from vramancer.arbiter.types import Allocation, Priority, WorkloadType
from vramancer.models.backends.base import ModelBackend, Target
from vramancer.models.settings import GpuManagerSettings, ModelSpec
from vramancer.models.types import CPU, BackendKind, ModelState

DEFAULT_WORKLOAD = {
    BackendKind.OLLAMA: WorkloadType.LLM,
    BackendKind.TORCH: WorkloadType.EMBEDDING,
    BackendKind.PROCESS: WorkloadType.OTHER,
}
#: Owner prefix of the arbiter allocations of managed models (``model:NAME``).
MODEL_OWNER = "model:"


@dataclass(eq=False)
class ModelEntry:
    """One model's mutable record. Changed only on the event loop, under its locks."""

    spec: ModelSpec
    backend: ModelBackend
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: ModelState = ModelState.UNLOADED
    device: str | None = None
    target: Target | None = None
    #: VRAM accounted for it now (arbiter allocation, simulated telemetry).
    used_bytes: int = 0
    #: Bytes added to a simulated GPU's telemetry (given back on unload).
    sim_bytes: int = 0
    allocation: Allocation | None = None
    last_used: float | None = None
    last_used_wall: float | None = None
    loaded_at: float | None = None
    in_use: int = 0
    draining: int = 0
    error: str | None = None
    variant: str | None = None
    loads: int = 0
    last_load_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> BackendKind:
        return self.backend.kind

    @property
    def priority(self) -> Priority:
        return Priority(self.spec.priority)

    @property
    def rank(self) -> int:
        """The priority's rank (``Priority.rank``: background 0 ... user_facing 3)."""
        return self.priority.rank

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device != CPU

    def idle_since(self) -> float | None:
        """Monotonic time of the last use, else of the load; None when never loaded."""
        return self.last_used if self.last_used is not None else self.loaded_at


@dataclass(eq=False)
class Waiter:
    """A request queued for a model to load on one GPU."""

    model: str
    since: float
    future: asyncio.Future[bool]


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """What ``use()`` yields: the model's placement and, for torch, the live object."""

    name: str
    device: str
    runs_on: str
    simulated: bool
    #: The torch module / pipeline; None for Ollama and process models.
    obj: Any = None
    #: Where to send requests (Ollama's endpoint); None for torch.
    endpoint: str | None = None
    #: Ollama: the model to name in requests, the smaller variant's tag while ``optimize`` has
    #: switched to it (naming the full model would make Ollama load it behind VRAMancer).
    backend_model: str | None = None
    #: Ollama: the ``keep_alive`` to send with requests; without one Ollama applies its own
    #: 5 minute default to the model and may unload it by itself.
    keep_alive: str | int | None = None


class Limits:
    """A model's own timeouts and retries, else the ``[gpu_manager]`` defaults."""

    def __init__(self, gm: GpuManagerSettings) -> None:
        self.gm = gm

    def workload(self, entry: ModelEntry) -> WorkloadType:
        if entry.spec.workload_type is not None:
            return WorkloadType(entry.spec.workload_type)
        return DEFAULT_WORKLOAD[entry.kind]

    def idle_timeout(self, entry: ModelEntry) -> float:
        return entry.spec.idle_timeout_s or self.gm.idle_timeout_s

    def load_timeout(self, entry: ModelEntry) -> float:
        return entry.spec.load_timeout_s or self.gm.load_timeout_s

    def unload_timeout(self, entry: ModelEntry) -> float:
        return entry.spec.unload_timeout_s or self.gm.unload_timeout_s

    def retries(self, entry: ModelEntry) -> int:
        spec = entry.spec
        return (
            spec.max_load_retries if spec.max_load_retries is not None else self.gm.max_load_retries
        )

    def op_wait_s(self, entry: ModelEntry) -> float:
        """How long a request waits for a load or unload in progress before looking again."""
        attempts = 1 + self.retries(entry)
        per_try = self.load_timeout(entry) + self.gm.retry_backoff_s
        return attempts * per_try + self.gm.queue_max_wait_s
