"""Arbiter records (seed 003): workload types, priorities, allocations.

INTERFACE SKELETON — shared by models/ and tasks/; the arbiter issue fills in the service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


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
        return _RANK[self]


_RANK = {Priority.BACKGROUND: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.USER_FACING: 3}


@dataclass(frozen=True, slots=True)
class Allocation:
    """Memory granted by the arbiter. ``device`` is ``gpu:N`` (VRAMancer index) or ``None``."""

    id: str
    workload_type: WorkloadType
    priority: Priority
    memory_bytes: int
    quality_target: float
    device: str | None = None
    owner: str | None = None
    created_at: float = 0.0


#: Called with the allocation being taken away when a higher priority preempts it.
PreemptCallback = Callable[[Allocation], None]


@dataclass(frozen=True, slots=True)
class ArbiterState:
    budget_bytes: int
    allocated_bytes: int
    allocations: tuple[Allocation, ...] = field(default_factory=tuple)
