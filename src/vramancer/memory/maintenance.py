"""The store's maintenance loop: one background asyncio task that runs a maintenance pass
(``TieredStore.maintain``: stale catalog rows, queued promotions, an eviction cycle) every
``memory.eviction_interval_s``, or as soon as any thread wakes it (a queued promotion, a tier past
its high mark). The pass runs in a worker thread: it takes the store's locks and does I/O."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from vramancer.errors import InsufficientStorage, ShuttingDown

log = logging.getLogger("vramancer.memory.store")


class MaintenanceLoop:
    """Runs ``maintain`` on an interval and on :meth:`wake`, between :meth:`start` and
    :meth:`stop`. A pass that raises ``ShuttingDown`` ends the loop; a full disk or any other
    error is logged and the loop goes on."""

    def __init__(self, maintain: Callable[[], None], interval_s: float) -> None:
        self._maintain = maintain
        self._interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wake_sent = False
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the loop runs (work can be left to it rather than done by the caller)."""
        return self._loop is not None

    def start(self) -> None:
        """Start the loop on the running event loop (no-op when already started)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="vramancer-memory")

    async def stop(self) -> None:
        """Cancel the loop and wait for it."""
        task, self._task = self._task, None
        self._loop = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """From any thread: run a pass soon (once, however many wake it before it runs)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or self._wake_sent:
            return
        self._wake_sent = True
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            self._wake_sent = False
            try:
                await asyncio.to_thread(self._maintain)
            except ShuttingDown:
                return
            except InsufficientStorage as exc:
                log.warning("memory maintenance: %s", exc.message)
            except Exception:
                log.exception("memory maintenance failed")
