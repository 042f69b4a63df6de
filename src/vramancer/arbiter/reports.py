"""What the arbiter reports: the quality to run at now, ``state()`` and ``stats()``.

Functions named ``*_locked`` read the allocation table and expect its lock held; the rest work
on values already copied out of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vramancer.arbiter.policy import Budget, Grant, QualityPolicy, pressure_ratio
from vramancer.arbiter.table import AllocationTable
from vramancer.arbiter.types import (
    Allocation,
    ArbiterState,
    DeviceUsage,
    Priority,
    WorkloadType,
)


@dataclass(slots=True)
class Stats:
    """Counters since the arbiter was built; changed under the table lock."""

    requests: int = 0
    granted: int = 0
    denied_memory: int = 0
    denied_quality: int = 0
    timeouts: int = 0
    preemptions: int = 0
    released: int = 0
    quality_reductions: int = 0
    pressure_sum: float = 0.0
    quality_sum: dict[WorkloadType, float] = field(default_factory=dict)
    quality_count: dict[WorkloadType, int] = field(default_factory=dict)
    peak_allocated_bytes: int = 0

    def record_grant(self, kind: WorkloadType, plan: Grant, allocated_bytes: int) -> None:
        """A grant of ``kind`` by ``plan``, ``allocated_bytes`` granted in all after it."""
        self.granted += 1
        self.pressure_sum += plan.pressure_ratio
        self.quality_sum[kind] = self.quality_sum.get(kind, 0.0) + plan.quality_target
        self.quality_count[kind] = self.quality_count.get(kind, 0) + 1
        if plan.quality_target < 1.0:
            self.quality_reductions += 1
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, allocated_bytes)

    def report(self, *, waiters: int, uptime_s: float) -> dict[str, Any]:
        """The ``stats()`` answer."""
        denied = self.denied_memory + self.denied_quality + self.timeouts
        return {
            "total_allocations": self.requests,
            "successful_allocations": self.granted,
            "failed_allocations": denied,
            "denied": {
                "memory": self.denied_memory,
                "quality": self.denied_quality,
                "timeout": self.timeouts,
            },
            "released": self.released,
            "preemptions": self.preemptions,
            "quality_reductions": self.quality_reductions,
            "avg_memory_pressure": self.pressure_sum / self.granted if self.granted else 0.0,
            "avg_quality": {
                kind.value: self.quality_sum[kind] / self.quality_count[kind]
                for kind in sorted(self.quality_count)
            },
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "waiters": waiters,
            "uptime_s": uptime_s,
        }


def pressure_locked(table: AllocationTable, budget: Budget, device: str | None) -> float:
    """Granted over budget in all, or the higher of that and ``device``'s own ratio."""
    pressure = pressure_ratio(table.allocated_locked(), budget.total_bytes)
    if device is not None:
        pressure = max(
            pressure,
            pressure_ratio(table.allocated_locked(device), budget.devices.get(device, 0)),
        )
    return pressure


def device_usage_locked(table: AllocationTable, budget: Budget) -> tuple[DeviceUsage, ...]:
    """Budget and granted bytes of every GPU in ``budget``, by name."""
    return tuple(
        DeviceUsage(
            name,
            size,
            table.allocated_locked(name),
            budget.external.get(name, 0),
            budget.outside(name),
        )
        for name, size in sorted(budget.devices.items())
    )


def arbiter_state(
    policy: QualityPolicy,
    budget: Budget,
    allocations: tuple[Allocation, ...],
    *,
    allocated: int,
    devices: tuple[DeviceUsage, ...],
    waiters: int,
    stopping: bool,
) -> ArbiterState:
    """The ``state()`` answer from values copied under the lock: adds the pressure, the
    quality each workload type would run at (normal priority) and the live count per type."""
    pressure = pressure_ratio(allocated, budget.total_bytes)
    qualities = {kind: policy.quality(kind, Priority.NORMAL, pressure) for kind in WorkloadType}
    active = {kind: sum(1 for a in allocations if a.workload_type is kind) for kind in WorkloadType}
    return ArbiterState(
        budget_bytes=budget.total_bytes,
        allocated_bytes=allocated,
        allocations=allocations,
        available_bytes=max(0, budget.grantable_total - allocated),
        pressure_ratio=pressure,
        qualities=qualities,
        active=active,
        devices=devices,
        waiters=waiters,
        shutting_down=stopping,
    )
