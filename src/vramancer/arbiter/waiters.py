"""``acquire()`` waiters: the queue of requests waiting for memory, and their wake-up.

A waiter belongs to the event loop that called ``acquire``; it is resolved (granted or failed)
under the arbiter's lock by whichever thread frees memory, and woken afterwards, outside the
lock, with ``call_soon_threadsafe`` on its own loop. Order: highest priority first, then first
come; a waiter that cannot be served holds back later ones on its device (every later one if
it names no device), so big requests do not starve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Gauge

from vramancer.arbiter.types import Allocation, AllocationRequest
from vramancer.errors import VramancerError


@dataclass(slots=True)
class Waiter:
    """An ``acquire`` call waiting for memory; resolved under the lock, woken on its loop."""

    request: AllocationRequest
    seq: int
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    allocation: Allocation | None = None
    error: VramancerError | None = None

    @classmethod
    def here(cls, request: AllocationRequest, seq: int) -> Waiter:
        """A waiter on the running event loop."""
        return cls(request=request, seq=seq, loop=asyncio.get_running_loop(), event=asyncio.Event())

    def wake(self) -> bool:
        """Wake the ``acquire`` call from any thread; False when its loop is closed (nobody
        will take the grant)."""
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:
            return False
        return True

    async def wait(self, timeout: float) -> bool:
        """Wait to be woken; False after ``timeout`` seconds. Cancellation propagates."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class WaitQueue:
    """The waiting ``acquire`` calls. Every method expects the arbiter's lock held."""

    __slots__ = ("_gauge", "_waiters")

    def __init__(self, gauge: Gauge) -> None:
        self._waiters: list[Waiter] = []
        self._gauge = gauge

    def __len__(self) -> int:
        return len(self._waiters)

    def add(self, waiter: Waiter) -> None:
        self._waiters.append(waiter)

    def drop(self, waiter: Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self.publish()

    def fail_all(self, error: VramancerError) -> list[Waiter]:
        """Fail every waiter with ``error`` and empty the queue; those to wake."""
        failed = list(self._waiters)
        for waiter in failed:
            waiter.error = error
        self._waiters.clear()
        return failed

    def serve(self, try_grant: Callable[[AllocationRequest], Allocation | None]) -> list[Waiter]:
        """Grant what can be granted now, in queue order (``try_grant`` is None when the
        request does not fit); the waiters served, to wake."""
        if not self._waiters:
            return []
        blocked_all = False
        blocked: set[str] = set()
        served: list[Waiter] = []
        for waiter in sorted(self._waiters, key=lambda w: (-w.request.priority.rank, w.seq)):
            device = waiter.request.device_name
            if blocked_all or (device is not None and device in blocked):
                continue
            allocation = try_grant(waiter.request)
            if allocation is not None:
                waiter.allocation = allocation
                self._waiters.remove(waiter)
                served.append(waiter)
            elif device is None:
                blocked_all = True
            else:
                blocked.add(device)
        self.publish()
        return served

    def publish(self) -> None:
        """Set the waiters gauge."""
        self._gauge.set(len(self._waiters))
