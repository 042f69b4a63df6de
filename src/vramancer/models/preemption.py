"""Preemption of a model's arbiter allocation.

The arbiter calls ``on_preempt`` from whatever thread took the memory; ``PreemptionInbox``
records the allocation under a thread lock and hands it to the event loop. ``Preemptions``
then frees the GPU: a model that can move goes to the CPU, the others are unloaded (and loaded
again on the CPU when their backend says so). When our own booking preempted models on the GPU
we are about to load on, ``settle`` frees them at once, under the GPU lock the load holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from vramancer import event_types as ev
from vramancer.arbiter.types import Allocation, PreemptCallback
from vramancer.errors import InsufficientMemory, VramancerError
from vramancer.events import EventBus
from vramancer.models import policy
from vramancer.models.entry import ModelEntry
from vramancer.models.locks import Locks
from vramancer.models.table import ModelTable
from vramancer.models.types import CPU, ModelState

if TYPE_CHECKING:
    from vramancer.models.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class PreemptionInbox:
    """Preempted allocation id -> model name, filled from any thread."""

    def __init__(self) -> None:
        self._preempted: dict[str, str] = {}
        self._lock = threading.Lock()
        #: The manager's event loop (set by ``start``); None: nobody to tell yet.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Called on the event loop with each preempted allocation id.
        self.deliver: Callable[[str], None] = lambda _allocation_id: None

    def callback(self, name: str) -> PreemptCallback:
        def on_preempt(allocation: Allocation) -> None:
            with self._lock:
                self._preempted[allocation.id] = name
            loop = self.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self.deliver, allocation.id)

        return on_preempt

    def peek(self, allocation_id: str) -> str | None:
        with self._lock:
            return self._preempted.get(allocation_id)

    def take(self, allocation_id: str) -> str | None:
        with self._lock:
            return self._preempted.pop(allocation_id, None)

    def forget(self, allocation_id: str) -> None:
        """The allocation was released by us: a late preemption of it means nothing."""
        self.take(allocation_id)

    def pending(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._preempted.items())


class Preemptions:
    def __init__(
        self,
        table: ModelTable,
        *,
        inbox: PreemptionInbox,
        locks: Locks,
        lifecycle: Lifecycle,
        events: EventBus,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self.table = table
        self.inbox = inbox
        self.locks = locks
        self.lifecycle = lifecycle
        self.events = events
        self._spawn = spawn
        inbox.deliver = self._schedule

    def _schedule(self, allocation_id: str) -> None:
        if not self.table.stopping:
            self._spawn(self.handle(allocation_id))

    async def handle(self, allocation_id: str) -> None:
        """Free the GPU of the model whose allocation ``allocation_id`` was preempted."""
        name = self.inbox.peek(allocation_id)
        if name is None:
            return
        entry = self.table.entries[name]
        try:
            async with self.locks.quiesce(entry), self.locks.locked(entry):
                if self.inbox.take(allocation_id) is None:
                    return
                await self._on_preempted(entry, allocation_id)
        except VramancerError as exc:
            log.warning("yielding %s after preemption failed: %s", name, exc.message)

    async def settle(self, device: str) -> None:
        """Our own booking preempted models on ``device``: free them now, under the GPU lock
        we hold, before anything loads there."""
        for allocation_id, name in self.inbox.pending():
            entry = self.table.entries[name]
            if entry.device != device or entry.allocation is None:
                continue
            if entry.allocation.id != allocation_id or self.inbox.take(allocation_id) is None:
                continue
            if entry.in_use:
                busy = policy.NoRoom(0, 0, (name,), busy=(name,))
                with contextlib.suppress(InsufficientMemory):
                    await self.lifecycle.wait_for_users([entry], entry, device, busy)
            await self._on_preempted(entry, allocation_id)

    async def _on_preempted(self, entry: ModelEntry, allocation_id: str) -> None:
        if entry.allocation is None or entry.allocation.id != allocation_id:
            return
        entry.allocation = None  # already taken by the arbiter: nothing to release
        self.events.publish(
            ev.ModelPreempted(model=entry.name, device=entry.device, allocation_id=allocation_id)
        )
        if entry.state is not ModelState.LOADED or not entry.on_gpu:
            return
        lifecycle = self.lifecycle
        cpu_allowed = CPU in entry.spec.allowed_devices
        if entry.backend.can_move and cpu_allowed:
            await lifecycle.move_locked(entry, CPU, "preempted")
            return
        await lifecycle.unload_locked(entry, "preempted")
        if entry.backend.reload_on_cpu and cpu_allowed:
            await lifecycle.load_locked(entry, CPU, "preempted")
