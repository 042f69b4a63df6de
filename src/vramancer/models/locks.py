"""The manager's locks: one per model, one per GPU, always taken model first, then the GPUs
sorted (so two operations never wait on each other in a cycle); and draining a model of its
users before an unload or a move."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from vramancer.models.entry import ModelEntry
from vramancer.models.errors import ModelBusy
from vramancer.models.table import ModelTable
from vramancer.models.types import CPU


class Locks:
    def __init__(self, table: ModelTable) -> None:
        self.table = table
        self._devices: dict[str, asyncio.Lock] = {}

    def device(self, device: str) -> asyncio.Lock:
        lock = self._devices.get(device)
        if lock is None:
            lock = self._devices[device] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def locked(self, entry: ModelEntry, *devices: str | None) -> AsyncIterator[None]:
        """Hold the model's lock, then the locks of the GPUs it is on or goes to (sorted)."""
        async with entry.lock:
            wanted = {
                d for d in (entry.device, *devices) if d is not None and d not in (CPU, "gpu")
            }
            async with contextlib.AsyncExitStack() as stack:
                for device in sorted(wanted):
                    await stack.enter_async_context(self.device(device))
                yield

    @contextlib.asynccontextmanager
    async def quiesce(self, entry: ModelEntry) -> AsyncIterator[None]:
        """Stop new users of ``entry`` and wait for the current ones to finish."""
        table = self.table
        wait_s = table.gm.queue_max_wait_s
        entry.draining += 1
        table.bump()
        try:
            if not await table.wait_until(lambda: entry.in_use == 0, wait_s):
                raise ModelBusy(
                    f"{entry.name} is still in use by {entry.in_use} user(s) after {wait_s:g} s",
                    model=entry.name,
                    in_use=entry.in_use,
                )
            yield
        finally:
            entry.draining -= 1
            table.bump()
