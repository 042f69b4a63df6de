"""The arbiter's budget: what it may hand out, in all and per GPU, read from the devices.

Each GPU's budget is ``usable_fraction`` of its memory, keyed by its ``DeviceId`` name
(``gpu:N``); the total is their sum, or ``[arbiter] budget`` when set. New grants are planned
against it less the memory used outside VRAMancer now (``with_external``): the driver's used
bytes less what the arbiter has reserved there, never granted. :class:`BudgetKeeper`
holds the current one; the arbiter reads and replaces it under its table lock.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from vramancer.arbiter.policy import Budget, Usage
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.devices.holders import external_bytes
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import HostSnapshot, SystemSnapshot


class SnapshotSource(Protocol):
    """What the arbiter needs of the device manager: the latest frozen snapshot."""

    def snapshot(self) -> SystemSnapshot: ...


class NoDevices:
    """A device source with no GPU, for an arbiter built with a given budget (``for_vram_gb``)."""

    def snapshot(self) -> SystemSnapshot:
        host = HostSnapshot(
            cpu_count=1,
            cpu_utilization_ratio=0.0,
            memory_total_bytes=0,
            memory_available_bytes=0,
            memory_used_bytes=0,
            swap_total_bytes=0,
            swap_used_bytes=0,
        )
        return SystemSnapshot(host=host)


def detect_budget(snapshot: SystemSnapshot, settings: ArbiterSettings) -> Budget:
    """The budget of ``snapshot``'s GPUs under ``settings``."""
    fraction = settings.usable_fraction
    devices = {
        str(DeviceId.gpu(g.index)): int(g.memory_total_bytes * fraction) for g in snapshot.gpus
    }
    memory = {str(DeviceId.gpu(g.index)): g.memory_total_bytes for g in snapshot.gpus}
    given = settings.budget
    total = given if given is not None else sum(devices.values())
    return Budget(total_bytes=total, devices=devices, memory=memory)


def with_external(budget: Budget, snapshot: SystemSnapshot, usage: Usage) -> Budget:
    """``budget`` with each GPU's memory used outside VRAMancer now: what the driver reports
    used less what is reserved there (``devices.holders.external_bytes``)."""
    external: dict[str, int] = {}
    for gpu in snapshot.gpus:
        name = str(DeviceId.gpu(gpu.index))
        if name in budget.devices:
            outside = external_bytes(gpu.memory_used_bytes, usage.devices.get(name, 0))
            if outside:
                external[name] = outside
    if not external and not budget.external:
        return budget
    return replace(budget, external=external)


class BudgetKeeper:
    """The current budget, detected on first use. Not locked itself: the arbiter calls
    :meth:`current` and :meth:`replace` under its table lock, :meth:`detect` outside it."""

    __slots__ = ("_budget", "_devices", "_settings")

    def __init__(self, settings: ArbiterSettings, devices: SnapshotSource) -> None:
        self._settings = settings
        self._devices = devices
        self._budget: Budget | None = None

    def detect(self) -> Budget:
        """Read the devices now (the budget in force is not changed)."""
        return detect_budget(self._devices.snapshot(), self._settings)

    def current(self) -> Budget:
        """The budget in force (detected on the first call)."""
        if self._budget is None:
            self._budget = self.detect()
        return self._budget

    def for_grants(self, usage: Usage) -> Budget:
        """The budget in force with the memory used outside VRAMancer now (what a new grant
        is planned against)."""
        return with_external(self.current(), self._devices.snapshot(), usage)

    def replace(self, budget: Budget) -> Budget | None:
        """Put ``budget`` in force; the previous one (None before the first)."""
        old, self._budget = self._budget, budget
        return old
