"""The allocation table: live allocations, their running totals, preemption callbacks and the
recent preemptions, under the one lock of the arbiter.

Every method whose name ends in ``_locked`` expects :attr:`AllocationTable.lock` held by the
caller; the table never calls out (no callback, event or metric), so holding the lock is short
and cannot re-enter the arbiter from foreign code.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from vramancer.arbiter.policy import Budget, Usage
from vramancer.arbiter.types import Allocation, PreemptCallback, Priority

#: What ``get`` reports of a preempted allocation: reason, by, by_priority, by_owner.
PreemptionInfo = dict[str, Any]


class AllocationTable:
    """Live allocations by id, with bytes in all, per device, and a count per priority."""

    def __init__(self, preempted_history: int) -> None:
        #: The arbiter's one lock (re-entrant: a locked step may call another).
        self.lock = threading.RLock()
        self.allocations: dict[str, Allocation] = {}
        self.total_bytes = 0
        self.device_bytes: dict[str, int] = {}
        self.priority_count: dict[Priority, int] = {p: 0 for p in Priority}
        self._callbacks: dict[str, PreemptCallback] = {}
        self._preempted: OrderedDict[str, PreemptionInfo] = OrderedDict()
        self._history = preempted_history
        #: One sequence for allocations and ``acquire`` waiters (allocation ids follow it).
        self._seq = itertools.count(1)

    def next_seq(self) -> int:
        return next(self._seq)

    # ------------------------------------------------------------------ changes

    def insert_locked(self, allocation: Allocation, on_preempt: PreemptCallback | None) -> None:
        self.allocations[allocation.id] = allocation
        self.total_bytes += allocation.memory_bytes
        if allocation.device is not None:
            device = allocation.device
            self.device_bytes[device] = self.device_bytes.get(device, 0) + allocation.memory_bytes
        self.priority_count[allocation.priority] += 1
        if on_preempt is not None:
            self._callbacks[allocation.id] = on_preempt

    def remove_locked(self, allocation_id: str) -> Allocation | None:
        """Take ``allocation_id`` out (its callback too); None when it is not live."""
        allocation = self.allocations.pop(allocation_id, None)
        if allocation is None:
            return None
        self.total_bytes -= allocation.memory_bytes
        if allocation.device is not None:
            self.device_bytes[allocation.device] -= allocation.memory_bytes
        self.priority_count[allocation.priority] -= 1
        self._callbacks.pop(allocation_id, None)
        return allocation

    def take_locked(
        self, victim: Allocation, *, by: Allocation | None, reason: str
    ) -> tuple[PreemptCallback | None, PreemptionInfo]:
        """Preempt ``victim``: remove it, remember why (up to ``preempted_history``), and
        return its callback and that record, for the caller to act on after the lock."""
        callback = self._callbacks.get(victim.id)
        self.remove_locked(victim.id)
        info: PreemptionInfo = {
            "reason": reason,
            "by": by.id if by is not None else None,
            "by_priority": by.priority.value if by is not None else None,
            "by_owner": by.owner if by is not None else None,
        }
        if self._history > 0:
            self._preempted[victim.id] = info
            while len(self._preempted) > self._history:
                self._preempted.popitem(last=False)
        return callback, info

    def set_preemptible_locked(self, allocation_id: str, preemptible: bool) -> bool:
        held = self.allocations.get(allocation_id)
        if held is None:
            return False
        if held.preemptible != preemptible:
            self.allocations[allocation_id] = replace(held, preemptible=preemptible)
        return True

    # ------------------------------------------------------------------ reads

    def preempted_locked(self, allocation_id: str) -> PreemptionInfo | None:
        """Why ``allocation_id`` was preempted, if it is among the remembered ones."""
        return self._preempted.get(allocation_id)

    def allocated_locked(self, device: str | None = None) -> int:
        """Bytes granted in all, or to allocations naming ``device``."""
        if device is None:
            return self.total_bytes
        return self.device_bytes.get(device, 0)

    def usage_locked(self) -> Usage:
        return Usage(self.total_bytes, dict(self.device_bytes))

    def available_locked(self, budget: Budget, device: str | None) -> int:
        """Free bytes in the tighter of the total and ``device``'s budget."""
        free = budget.grantable_total - self.total_bytes
        if device is not None:
            free = min(free, budget.grantable(device) - self.allocated_locked(device))
        return max(0, free)

    def by_age_locked(self) -> list[Allocation]:
        """Live allocations, oldest first."""
        return sorted(self.allocations.values(), key=lambda a: a.seq)
