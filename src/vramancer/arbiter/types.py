"""Arbiter records (seed 003): workload types, priorities, allocations, state.

Shared by ``models/`` (model loads) and ``tasks/`` (task VRAM reservations), which both ask the
arbiter for memory. Everything here is a frozen value; the service lives in ``arbiter.py`` and
the pure decisions in ``policy.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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

_DEVICE_RE = re.compile(r"^gpu:(\d+)$")


def device_key(device: str | int | None) -> str | None:
    """Normalise a device name to ``gpu:N`` (VRAMancer's GPU index), or ``None`` for "any".

    Accepts ``"gpu:N"`` or an ``int`` index (the tasks' ``gpu`` pin). Raises ``ValueError``
    naming the expected form otherwise.
    """
    if device is None:
        return None
    if isinstance(device, bool):
        raise ValueError(f"device must be 'gpu:N' or a GPU index, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"a GPU index cannot be negative (got {device})")
        return f"gpu:{device}"
    match = _DEVICE_RE.match(device.strip().lower())
    if match is None:
        raise ValueError(f"device must look like 'gpu:0' (VRAMancer's GPU index), got {device!r}")
    return f"gpu:{int(match.group(1))}"


@dataclass(frozen=True, slots=True)
class Allocation:
    """Memory granted by the arbiter. ``device`` is ``gpu:N`` (VRAMancer index) or ``None``.

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
class DeviceUsage:
    """One GPU's arbiter budget and what is granted on it (allocations naming it)."""

    device: str
    budget_bytes: int
    allocated_bytes: int

    @property
    def available_bytes(self) -> int:
        return max(0, self.budget_bytes - self.allocated_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "allocated_bytes": self.allocated_bytes,
            "available_bytes": self.available_bytes,
        }


@dataclass(frozen=True, slots=True)
class ArbiterState:
    """The arbiter at one instant (seed 003 ``ArbiterState``).

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
