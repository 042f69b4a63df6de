"""What the dispatcher sees of this node's GPUs, and why a waiting task waits.

``LocalViews.now()`` builds the picker's ``DeviceView``s from a device snapshot, the arbiter
(what it can still grant per GPU, its allocations, the memory used there outside VRAMancer)
and this node's running tasks. ``waiting_reasons`` applies the dispatcher's own rule
(``picker.pick``) to the ``waiting_gpu`` tasks against those views, so a reason shown to a user
is computed from the state now and never goes stale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vramancer.clock import Clock
from vramancer.devices.holders import external_bytes
from vramancer.devices.ids import DeviceId, gpu_name
from vramancer.devices.types import SystemSnapshot
from vramancer.tasks.dispatch import WAITING, hold_note, pinned_node
from vramancer.tasks.model import TaskRecord, TaskState
from vramancer.tasks.picker import (
    DeviceView,
    LocalLoad,
    PickerPolicy,
    Placement,
    Reserved,
    build_views,
    pick,
)
from vramancer.tasks.ports import ArbiterPort, DevicesPort
from vramancer.tasks.settings import TasksSettings


class LocalViews:
    """The picker's views of this node's GPUs, built from the current state on each call."""

    def __init__(
        self,
        devices: DevicesPort,
        arbiter: ArbiterPort,
        loads: Callable[[SystemSnapshot], dict[str, LocalLoad]],
        settings: TasksSettings,
        clock: Clock,
    ) -> None:
        self.devices = devices
        self.arbiter = arbiter
        self.loads = loads
        self.settings = settings
        self.clock = clock

    def now(self) -> list[DeviceView]:
        snapshot = self.devices.snapshot()
        return build_views(
            snapshot,
            self.clock.monotonic(),
            grantable=self._grantable(snapshot),
            local=self.loads(snapshot),
            slots_per_device=self.settings.slots_per_device,
            host_slots=self.settings.host_slots,
            reserved=self._reserved(snapshot),
        )

    def _reserved(self, snapshot: SystemSnapshot) -> dict[str, Reserved]:
        """The arbiter's allocations per GPU and the memory used there outside VRAMancer."""
        count: dict[str, int] = {}
        held: dict[str, int] = {}
        for allocation in self.arbiter.allocations():
            if allocation.device is not None:
                count[allocation.device] = count.get(allocation.device, 0) + 1
                held[allocation.device] = held.get(allocation.device, 0) + allocation.memory_bytes
        out = {}
        for gpu in snapshot.gpus:
            name = gpu_name(gpu.index)
            reserved = held.get(name, 0)
            external = external_bytes(gpu.memory_used_bytes, reserved)
            out[name] = Reserved(count.get(name, 0), reserved, external)
        return out

    def _grantable(self, snapshot: SystemSnapshot) -> dict[str, int]:
        """What the arbiter can still grant per GPU without preempting anyone (its
        ``headroom``: the per-GPU budget less its grants, bounded by what is left in all)."""
        devices = [DeviceId.gpu(gpu.index) for gpu in snapshot.gpus]
        return {str(device): self.arbiter.headroom(device) for device in devices}


def waiting_reasons(
    records: Sequence[TaskRecord], views: list[DeviceView], policy: PickerPolicy, *, pool: bool
) -> dict[str, str]:
    """Why each ``waiting_gpu`` record of ``records`` waits, by task id, from ``views``."""
    out = {}
    for record in records:
        if record.state is not TaskState.WAITING_GPU:
            continue
        node = pinned_node(record) if pool else None
        decision = pick(views, record.vram_bytes, record.gpu, policy, node)
        if isinstance(decision, Placement):
            # Room now: the last round's decision stands (a device held for a task that
            # waited longer is only known to the round), else it starts at the next one.
            out[record.task_id] = record.error or (
                f"{WAITING}{decision.device} has room now; it starts at the next dispatch round"
            )
        else:
            out[record.task_id] = WAITING + decision.message() + hold_note(record.error)
    return out
