"""The idle reaper: unloads every model idle for its timeout (its own, else the
``[gpu_manager]`` default). A model in use, being drained, or never-evict is left alone; one
busy with another operation is looked at again on the next tick."""

from __future__ import annotations

import logging

from vramancer import event_types as ev
from vramancer.errors import VramancerError
from vramancer.events import EventBus
from vramancer.models.entry import ModelEntry
from vramancer.models.lifecycle import Lifecycle
from vramancer.models.locks import Locks
from vramancer.models.table import ModelTable
from vramancer.models.types import ModelState

log = logging.getLogger(__name__)


class IdleReaper:
    def __init__(
        self, table: ModelTable, *, locks: Locks, lifecycle: Lifecycle, events: EventBus
    ) -> None:
        self.table = table
        self.locks = locks
        self.lifecycle = lifecycle
        self.events = events

    async def reap_once(self, now: float | None = None) -> list[str]:
        """Unload the models idle for their timeout; returns their names."""
        table = self.table
        now = table.clock.monotonic() if now is None else now
        reaped: list[str] = []
        for entry in list(table.values()):
            if entry.lock.locked():  # busy with another operation: next tick
                continue
            idle_s = _idle_s(entry, now)
            timeout = table.limits.idle_timeout(entry)
            if idle_s is None or idle_s < timeout or entry.spec.never_evict:
                continue
            if await self._reap(entry, now, timeout):
                reaped.append(entry.name)
                self.events.publish(
                    ev.IdleUnload(model=entry.name, idle_s=round(idle_s, 3), idle_timeout_s=timeout)
                )
        return reaped

    async def _reap(self, entry: ModelEntry, now: float, timeout: float) -> bool:
        try:
            async with self.locks.locked(entry):
                idle_s = _idle_s(entry, now)  # re-read: it may have been used meanwhile
                if idle_s is None or idle_s < timeout:
                    return False
                await self.lifecycle.unload_locked(entry, "idle")
                return True
        except VramancerError as exc:
            log.warning("idle unload of %s failed: %s", entry.name, exc.message)
            return False


def _idle_s(entry: ModelEntry, now: float) -> float | None:
    """Seconds ``entry`` has been idle; None when it is not loaded, or in use or draining."""
    if entry.state is not ModelState.LOADED or entry.in_use or entry.draining:
        return None
    since = entry.idle_since()
    return None if since is None else now - since
