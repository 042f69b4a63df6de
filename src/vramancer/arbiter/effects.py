"""The arbiter's side effects and metrics.

Lock discipline: every change to the allocation table happens under its lock and only
*records* what must follow in an :class:`Effects`; :meth:`EffectRunner.apply` performs it after
the lock is released: preemption callbacks, ``preempted`` / ``allocation_granted`` /
``allocation_released`` events, waking ``acquire`` waiters, metrics. A callback or an event
subscriber may therefore call back into the arbiter (release, allocate) without deadlock or
seeing a half-applied change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vramancer import event_types as ev
from vramancer.arbiter.policy import Budget, pressure_ratio
from vramancer.arbiter.table import AllocationTable, PreemptionInfo
from vramancer.arbiter.types import Allocation, PreemptCallback, Priority
from vramancer.arbiter.waiters import Waiter
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

#: Reasons a request is refused (a ``reason`` label of the denials counter).
DENIAL_REASONS = ("memory", "quality", "timeout")


@dataclass(slots=True)
class Effects:
    """Side effects gathered under the lock, performed after it is released."""

    preempted: list[tuple[Allocation, PreemptCallback | None, PreemptionInfo]] = field(
        default_factory=list
    )
    granted: list[Allocation] = field(default_factory=list)
    wake: list[Waiter] = field(default_factory=list)
    released: list[Allocation] = field(default_factory=list)


class ArbiterMetrics:
    """The arbiter's Prometheus series, every label pre-created at zero."""

    def __init__(self, metrics: Metrics) -> None:
        self.budget = metrics.gauge(
            "vramancer_arbiter_budget_bytes", "VRAM the arbiter may hand out."
        )
        self.allocated = metrics.gauge(
            "vramancer_arbiter_allocated_bytes", "VRAM granted to allocations."
        )
        self.pressure = metrics.gauge(
            "vramancer_arbiter_pressure_ratio", "Granted VRAM over the arbiter's budget."
        )
        count = metrics.gauge(
            "vramancer_arbiter_allocations", "Live allocations by priority.", ["priority"]
        )
        self.preemptions = metrics.counter(
            "vramancer_arbiter_preemptions_total",
            "Allocations taken away, by the victim's priority.",
            ["priority"],
        )
        self.denials = metrics.counter(
            "vramancer_arbiter_denials_total",
            "Requests refused, by reason (memory, quality, timeout).",
            ["reason"],
        )
        self.waiters = metrics.gauge(
            "vramancer_arbiter_waiters", "acquire() calls waiting for memory."
        )
        self.wait = metrics.histogram(
            "vramancer_arbiter_wait_seconds", "Time acquire() waited before a grant."
        )
        self.count_by = {p: count.labels(priority=p.value) for p in Priority}
        for priority in Priority:
            self.count_by[priority].set(0)
            self.preemptions.labels(priority=priority.value)
        for reason in DENIAL_REASONS:
            self.denials.labels(reason=reason)

    def deny(self, reason: str) -> None:
        self.denials.labels(reason=reason).inc()


class EffectRunner:
    """Performs an :class:`Effects` outside the lock, then refreshes the gauges.

    ``budget`` is read under the table lock; ``release`` frees a grant nobody will take (its
    waiter's event loop is closed).
    """

    def __init__(
        self,
        table: AllocationTable,
        *,
        budget: Callable[[], Budget],
        events: EventBus,
        metrics: ArbiterMetrics,
        release: Callable[[str], None],
    ) -> None:
        self._table = table
        self._budget = budget
        self._events = events
        self._m = metrics
        self._release = release
        #: The last value set on each gauge (each set has a cost).
        self._published: dict[Any, float] = {}

    def apply(self, effects: Effects, skip_wake: Waiter | None = None) -> None:
        """Call preemption callbacks, publish events, wake waiters (but ``skip_wake``, the
        caller's own), update metrics."""
        for victim, callback, info in effects.preempted:
            self._preempted(victim, callback, info)
        for allocation in effects.granted:
            self._events.publish(allocation_event(ev.AllocationGranted, allocation))
        for allocation in effects.released:
            self._events.publish(allocation_event(ev.AllocationReleased, allocation))
        for waiter in effects.wake:
            if waiter is skip_wake:
                continue
            if not waiter.wake() and waiter.allocation is not None:
                self._release(waiter.allocation.id)
        self.update_gauges()

    def _preempted(
        self, victim: Allocation, callback: PreemptCallback | None, info: PreemptionInfo
    ) -> None:
        self._m.preemptions.labels(priority=victim.priority.value).inc()
        if callback is not None:
            try:
                callback(victim)
            except Exception:
                log.exception("on_preempt callback of %s failed", victim.id)
        self._events.publish(
            ev.Preempted(
                allocation_id=victim.id,
                owner=victim.owner,
                workload_type=victim.workload_type.value,
                priority=victim.priority.value,
                memory_bytes=victim.memory_bytes,
                device=victim.device,
                reason=info["reason"],
                by=info["by"],
                by_priority=info["by_priority"],
                by_owner=info["by_owner"],
            )
        )

    def update_gauges(self) -> None:
        """Set the gauges whose value changed since the last call."""
        table, m = self._table, self._m
        with table.lock:
            budget = self._budget()
            values: dict[Any, float] = {
                m.budget: budget.total_bytes,
                m.allocated: table.total_bytes,
                m.pressure: pressure_ratio(table.total_bytes, budget.total_bytes),
            }
            for priority, count in table.priority_count.items():
                values[m.count_by[priority]] = count
            changed = [(g, v) for g, v in values.items() if self._published.get(g) != v]
            self._published.update(changed)
        for gauge, value in changed:
            gauge.set(value)


def allocation_event(
    cls: type[ev.AllocationGranted] | type[ev.AllocationReleased], allocation: Allocation
) -> ev.AllocationGranted | ev.AllocationReleased:
    return cls(
        id=allocation.id,
        workload_type=allocation.workload_type.value,
        priority=allocation.priority.value,
        memory_bytes=allocation.memory_bytes,
        quality_target=allocation.quality_target,
        device=allocation.device,
        owner=allocation.owner,
        created_at=allocation.created_at,
        preemptible=allocation.preemptible,
        min_quality=allocation.min_quality,
    )
