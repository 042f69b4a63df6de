"""Arbiter records: workload types, priorities, allocations, state.

Shared by ``models/`` (model loads) and ``tasks/`` (task VRAM reservations), which both ask the
arbiter for memory. Everything here is a frozen value; the service lives in ``arbiter.py`` and
the pure decisions in ``policy.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vramancer.devices.ids import DeviceId
from vramancer.errors import InvalidInput


class WorkloadType(StrEnum):
    #: A language or vision-language model.
    LLM = "llm"
    #: Image diffusion.
    IMAGE = "image"
    #: Video generation.
    VIDEO = "video"
    #: Embedding models (CLIP, MiniLM ...).
    EMBEDDING = "embedding"
    #: Anything else (batch GPU tasks).
    OTHER = "other"


class Priority(StrEnum):
    #: Maintenance and batch work; first to be preempted.
    BACKGROUND = "background"
    #: The default.
    NORMAL = "normal"
    #: Important, preempts normal and background.
    HIGH = "high"
    #: A person is waiting on it; preempts everything else.
    USER_FACING = "user_facing"

    @property
    def rank(self) -> int:
        """Order of priorities: background 0 < normal 1 < high 2 < user_facing 3."""
        return _RANK[self]


_RANK = {Priority.BACKGROUND: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.USER_FACING: 3}


@dataclass(frozen=True, slots=True)
class Allocation:
    """Memory granted by the arbiter. ``device`` is the GPU's name (``str(DeviceId)``:
    ``gpu:N``) or ``None``.

    ``quality_target`` is the quality the holder should run at, decided at grant time from the
    memory pressure and the priority; ``Arbiter.recommended_quality`` gives the current value.
    ``seq`` orders allocations by grant time (the tie-break "most recent" in victim choice).
    A holder with ``preemptible=False`` (a never-evict model) is never chosen as a victim.
    """

    id: str
    workload_type: WorkloadType
    priority: Priority
    memory_bytes: int
    quality_target: float
    device: str | None = None
    owner: str | None = None
    created_at: float = 0.0
    seq: int = 0
    preemptible: bool = True
    min_quality: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workload_type": self.workload_type.value,
            "priority": self.priority.value,
            "memory_bytes": self.memory_bytes,
            "quality_target": self.quality_target,
            "device": self.device,
            "owner": self.owner,
            "created_at": self.created_at,
            "preemptible": self.preemptible,
            "min_quality": self.min_quality,
        }


#: Called with the allocation being taken away when a higher priority preempts it. It runs in
#: the thread of the preempting request, after the arbiter's lock is released; it must not block
#: for long (schedule the unload / move to the CPU and return).
PreemptCallback = Callable[[Allocation], None]


@dataclass(frozen=True, slots=True)
class AllocationRequest:
    """One request for VRAM, in typed values (the API and the CLI parse what users type).

    ``device``: the GPU it must be on (also checked against that GPU's budget), or None (the
    total budget only). ``min_quality``: refuse rather than run below it. ``preempt``: may it
    take memory from strictly lower priorities. The holder's side: ``owner`` (shown in
    listings and events), ``preemptible`` (False: never a victim), ``on_preempt`` (called if
    the allocation is later taken).
    """

    workload_type: WorkloadType
    priority: Priority
    memory_bytes: int
    min_quality: float | None = None
    device: DeviceId | None = None
    preempt: bool = True
    owner: str | None = None
    preemptible: bool = True
    on_preempt: PreemptCallback | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise InvalidInput(f"memory must be positive (got {self.memory_bytes})", field="memory")
        quality = self.min_quality
        if quality is not None and not 0.0 < quality <= 1.0:
            raise InvalidInput(
                f"min_quality must be in (0, 1] (got {quality!r})", field="min_quality"
            )
        if self.device is not None and not isinstance(self.device, DeviceId):
            raise TypeError(f"device must be a DeviceId, got {self.device!r}")
        if self.device is not None and self.device.is_cpu:
            raise InvalidInput("device must be a GPU (gpu:N), not the CPU", field="device")

    @property
    def device_name(self) -> str | None:
        """``device``'s name (``gpu:N``), the key of the budget and of ``Allocation.device``."""
        return str(self.device) if self.device is not None else None


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    """One GPU's arbiter budget and what is granted on it (allocations naming it)."""

    device: str
    budget_bytes: int
    allocated_bytes: int
    #: Memory used on the GPU outside VRAMancer now (never granted).
    external_bytes: int = 0
    #: The part of ``budget_bytes`` that external memory takes (beyond the budget's margin).
    outside_bytes: int = 0

    @property
    def available_bytes(self) -> int:
        return max(0, self.budget_bytes - self.outside_bytes - self.allocated_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "allocated_bytes": self.allocated_bytes,
            "available_bytes": self.available_bytes,
            "external_bytes": self.external_bytes,
        }


@dataclass(frozen=True, slots=True)
class ArbiterState:
    """The arbiter at one instant.

    ``qualities`` is the recommended quality per workload type at normal priority under the
    current pressure; ``active`` counts allocations per workload type.
    """

    budget_bytes: int
    allocated_bytes: int
    allocations: tuple[Allocation, ...] = field(default_factory=tuple)
    available_bytes: int = 0
    pressure_ratio: float = 0.0
    qualities: Mapping[WorkloadType, float] = field(default_factory=dict)
    active: Mapping[WorkloadType, int] = field(default_factory=dict)
    devices: tuple[DeviceUsage, ...] = ()
    waiters: int = 0
    shutting_down: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "allocated_bytes": self.allocated_bytes,
            "available_bytes": self.available_bytes,
            "pressure_ratio": self.pressure_ratio,
            "qualities": {k.value: v for k, v in self.qualities.items()},
            "active": {k.value: v for k, v in self.active.items()},
            "devices": [d.as_dict() for d in self.devices],
            "waiters": self.waiters,
            "shutting_down": self.shutting_down,
            "allocations": [a.as_dict() for a in self.allocations],
        }
