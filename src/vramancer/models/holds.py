"""Holding a model loaded for a user (``use()``, ``ensure_loaded``): load on demand, and the
per-GPU load queues.

A held model (``in_use`` > 0) is kept away from the idle reaper and from evictions, and its
arbiter allocation is not preemptible. Requests for a model that is not loaded wait in the
queue of the GPU it goes to; one drainer per GPU serves the queue a model at a time, all the
requests for that model at once, and serves a request that waited ``queue_max_wait_s`` first
(``policy.next_group``).
"""

from __future__ import annotations

import asyncio

from vramancer.errors import OperationTimeout, ShuttingDown
from vramancer.models import policy
from vramancer.models.booking import Booking
from vramancer.models.entry import ModelEntry, Waiter
from vramancer.models.lifecycle import Lifecycle
from vramancer.models.placement import Placer
from vramancer.models.table import ModelTable
from vramancer.models.types import CPU, ModelState

#: Rounds of "wait for the state to change, then try again" before a request gives up.
MAX_OBTAIN_ROUNDS = 64


class Holds:
    def __init__(
        self,
        table: ModelTable,
        *,
        placer: Placer,
        lifecycle: Lifecycle,
        booking: Booking,
    ) -> None:
        self.table = table
        self.placer = placer
        self.lifecycle = lifecycle
        self.booking = booking
        self.queues: dict[str, list[Waiter]] = {}
        self.drainers: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ holding

    async def obtain(self, entry: ModelEntry, device: str | None) -> None:
        """Return holding ``entry`` loaded (``in_use`` incremented)."""
        if self.table.stopping:
            raise ShuttingDown("the model manager is stopping")
        wanted = self.placer.validate_device(entry, device) if device is not None else None
        for _ in range(MAX_OBTAIN_ROUNDS):
            if self._holdable(entry, wanted):
                self._take(entry)
                return
            if entry.draining or entry.state in (ModelState.LOADING, ModelState.UNLOADING):
                await self.table.wait_changed(self.table.limits.op_wait_s(entry))
                continue
            target = self.placer.choose_target(entry, wanted)
            if target == CPU or entry.state is ModelState.LOADED:
                await self.lifecycle.place(entry, target, "request")
                continue
            if await self._enqueue(entry, target):
                return
        raise OperationTimeout(f"{entry.name} could not be held loaded (it kept changing state)")

    def release(self, entry: ModelEntry) -> None:
        entry.in_use = max(0, entry.in_use - 1)
        self.table.metrics.export_in_use(entry)
        if entry.in_use == 0:
            self.booking.shield(entry, False)
        self.table.bump()

    def holdable(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` can be held as it is now (loaded, not being drained)."""
        return self._holdable(entry, None)

    def take(self, entry: ModelEntry) -> None:
        """Hold ``entry`` (the caller checked ``holdable``)."""
        self._take(entry)

    def _holdable(self, entry: ModelEntry, wanted: str | None) -> bool:
        if entry.state is not ModelState.LOADED or entry.draining or entry.device is None:
            return False
        if wanted is None or wanted == entry.device:
            return True
        return wanted == "gpu" and entry.on_gpu

    def _take(self, entry: ModelEntry) -> None:
        entry.in_use += 1
        self.table.metrics.export_in_use(entry)
        if entry.in_use == 1:
            self.booking.shield(entry, True)

    # ------------------------------------------------------------------ load queues

    def _export_queue(self) -> None:
        self.table.metrics.queue.set(sum(len(q) for q in self.queues.values()))

    async def _enqueue(self, entry: ModelEntry, device: str) -> bool:
        """Wait in ``device``'s load queue; True when the drainer took a hold for us."""
        loop = asyncio.get_running_loop()
        waiter = Waiter(entry.name, self.table.clock.monotonic(), loop.create_future())
        self.queues.setdefault(device, []).append(waiter)
        self._export_queue()
        if device not in self.drainers:
            self.drainers[device] = asyncio.create_task(self._drain(device))
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            held = future.done() and not future.cancelled() and future.exception() is None
            if held and future.result():
                self.release(entry)
            raise

    async def _drain(self, device: str) -> None:
        """Serve ``device``'s queue one model at a time, all requests for it at once."""
        queue = self.queues[device]
        try:
            while queue:
                waiting = [policy.Waiting(w.model, w.since) for w in queue]
                name = policy.next_group(
                    waiting, self.table.clock.monotonic(), self.table.gm.queue_max_wait_s
                )
                group = [w for w in queue if w.model == name]
                queue[:] = [w for w in queue if w.model != name]
                self._export_queue()
                group = [w for w in group if not w.future.done()]
                if not group or name is None:
                    continue
                await self._serve_group(self.table.entries[name], device, group)
        finally:
            self.drainers.pop(device, None)

    async def _serve_group(self, entry: ModelEntry, device: str, group: list[Waiter]) -> None:
        try:
            await self.lifecycle.place(entry, device, "request")
        except Exception as exc:  # whatever the load raised is every waiter's answer
            for waiter in group:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
            return
        for waiter in group:
            if waiter.future.done():
                continue
            if self._holdable(entry, device):
                self._take(entry)
                waiter.future.set_result(True)
            else:
                waiter.future.set_result(False)

    def fail_waiting(self) -> None:
        """At shutdown: every queued request fails with ``ShuttingDown``."""
        for queue in self.queues.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(ShuttingDown("the model manager is stopping"))
            queue.clear()
