"""Booking with the arbiter: what a model holds on a GPU is an arbiter allocation (owner
``model:NAME``, the model's priority, preemptible unless never-evict or in use), plus, on a
simulated GPU, the same bytes added to its telemetry. A measured footprint off the booking by
more than ``RESIZE_TOLERANCE`` re-books it."""

from __future__ import annotations

import logging

from vramancer.arbiter.types import Allocation, AllocationRequest
from vramancer.devices.ids import DeviceId
from vramancer.errors import InsufficientMemory, VramancerError
from vramancer.models.backends.base import LoadResult, Target
from vramancer.models.entry import MODEL_OWNER, ModelEntry
from vramancer.models.ports import ArbiterPort, DevicePort
from vramancer.models.preemption import PreemptionInbox
from vramancer.models.table import ModelTable
from vramancer.models.types import gpu_index
from vramancer.units import format_size

log = logging.getLogger(__name__)

#: A measured footprint off the allocation by more than this factor makes the manager re-book.
RESIZE_TOLERANCE = 1.05


class Booking:
    def __init__(
        self,
        table: ModelTable,
        *,
        arbiter: ArbiterPort,
        devices: DevicePort,
        inbox: PreemptionInbox,
    ) -> None:
        self.table = table
        self.arbiter = arbiter
        self.devices = devices
        self.inbox = inbox

    def _request(self, entry: ModelEntry, device: str, size: int) -> Allocation:
        return self.arbiter.allocate(
            AllocationRequest(
                workload_type=self.table.limits.workload(entry),
                priority=entry.priority,
                memory_bytes=size,
                device=DeviceId.parse(device),
                owner=f"{MODEL_OWNER}{entry.name}",
                on_preempt=self.inbox.callback(entry.name),
                preemptible=not entry.spec.never_evict and entry.in_use == 0,
            )
        )

    def book(self, entry: ModelEntry, device: str, needed: int) -> bool:
        """Ask the arbiter for ``needed`` bytes on ``device``; False when it says no room."""
        try:
            allocation = self._request(entry, device, max(1, needed))
        except InsufficientMemory as exc:
            log.info("arbiter refused %s for %s: %s", format_size(needed), entry.name, exc.message)
            return False
        entry.allocation = allocation
        return True

    def shield(self, entry: ModelEntry, in_use: bool) -> None:
        """While a model is in use its arbiter allocation is no victim of preemption: it is
        never taken away under its user (a never-evict model's never is)."""
        if entry.allocation is not None and not entry.spec.never_evict:
            self.arbiter.set_preemptible(entry.allocation.id, not in_use)

    def account(self, entry: ModelEntry, target: Target, result: LoadResult) -> None:
        """Book what a load or move put on a GPU (arbiter, simulated telemetry)."""
        table = self.table
        if not target.on_gpu:
            entry.used_bytes = 0
            table.learn(entry, result.size_bytes)
            return
        measured = result.vram_bytes or 0
        table.learn(entry, measured or None)
        spec = entry.spec
        configured = spec.smaller_variant_vram if entry.variant is not None else spec.vram
        used = max(measured, configured or 0) or table.expected(entry)
        allocation = entry.allocation
        if allocation is not None and not (
            allocation.memory_bytes / RESIZE_TOLERANCE
            <= used
            <= allocation.memory_bytes * RESIZE_TOLERANCE
        ):
            self._resize(entry, target.device, used)
        entry.used_bytes = used
        index = gpu_index(target.device)
        if target.simulated and index is not None:
            self.adjust_sim(index, used)
            entry.sim_bytes = used

    def _resize(self, entry: ModelEntry, device: str, used: int) -> None:
        """Book ``used`` instead of the estimate. Smaller: give the old booking back first (the
        new one then fits). Bigger: ask first, keep the old booking if the arbiter says no."""
        old = entry.allocation
        shrink = old is not None and used < old.memory_bytes
        if shrink:
            self.release(old)
            entry.allocation = old = None
        try:
            new = self._request(entry, device, used)
        except VramancerError as exc:
            log.warning(
                "%s takes %s, more than booked; the arbiter refused more: %s",
                entry.name,
                format_size(used),
                exc.message,
            )
            return
        entry.allocation = new
        self.release(old)

    def drop(self, entry: ModelEntry) -> None:
        """Give back everything accounted for ``entry`` (simulated telemetry, then the
        booking: the arbiter, serving its waiters on release, must not see the model's bytes
        still used but no longer reserved, as memory used outside VRAMancer)."""
        index = gpu_index(entry.device)
        if entry.sim_bytes and index is not None:
            self.adjust_sim(index, -entry.sim_bytes)
        entry.sim_bytes = 0
        self.release(entry.allocation)
        entry.allocation = None
        entry.used_bytes = 0

    def release(self, allocation: Allocation | None) -> None:
        if allocation is None:
            return
        self.inbox.forget(allocation.id)
        try:
            self.arbiter.release_allocation(allocation.id)
        except VramancerError as exc:
            log.debug("releasing allocation %s: %s", allocation.id, exc.message)

    def adjust_sim(self, index: int, delta: int) -> None:
        try:
            self.devices.adjust_simulated(index, delta)
        except VramancerError as exc:
            log.warning(
                "cannot account %s on simulated gpu:%d: %s", format_size(delta), index, exc.message
            )
