"""Where a load goes: the device asked for, the pinned one, the profile's placement, else the
allowed GPU with room (the CPU when the model cannot fit there and may run on the CPU). The
choices themselves are ``policy.pick_gpu`` and ``policy.choose_evictions``; this reads the
devices and the room they need."""

from __future__ import annotations

from collections.abc import Callable

from vramancer.errors import InvalidInput
from vramancer.models import policy
from vramancer.models.entry import ModelEntry
from vramancer.models.ports import DevicePort
from vramancer.models.room import GpuRoom
from vramancer.models.table import ModelTable
from vramancer.models.types import (
    CPU,
    ModelState,
    Placement,
    PlacementKind,
    gpu_device,
    normalize_device,
)


class Placer:
    def __init__(
        self,
        table: ModelTable,
        *,
        devices: DevicePort,
        room: GpuRoom,
        placement_of: Callable[[str], Placement | None],
    ) -> None:
        self.table = table
        self.devices = devices
        self.room = room
        #: The placement the profile in force gives a model (None: it says nothing).
        self.placement_of = placement_of

    def validate_device(self, entry: ModelEntry, device: str) -> str:
        """``device`` normalised (``cpu``, ``gpu``, ``gpu:N``), if the model may go there."""
        gpus = [g.index for g in self.devices.snapshot().gpus]
        wanted = normalize_device(device, gpus)
        allowed = entry.spec.allowed_devices
        if wanted == CPU:
            ok = CPU in allowed
        elif wanted == "gpu":
            ok = any(a != CPU for a in allowed)
        else:
            ok = "gpu" in allowed or wanted in allowed
        if not ok:
            raise InvalidInput(
                f"{entry.name} may not run on {device} (allowed_devices: {allowed})",
                field="device",
            )
        return wanted

    def choose_target(self, entry: ModelEntry, wanted: str | None) -> str:
        """Where a load of ``entry`` goes (see the module docstring)."""
        snap = self.devices.snapshot()
        gpus = [g.index for g in snap.gpus]
        if not gpus:
            return CPU  # CPU-only mode: every model runs on the CPU
        if wanted is not None and wanted != "gpu":
            return wanted
        if wanted is None and entry.state is ModelState.LOADED and entry.device is not None:
            return entry.device
        view = self.table.view(entry, self.table.clock.monotonic())
        free = {i: self.room.room(i) for i in gpus}
        if wanted is None:
            if entry.spec.pinned_device is not None:
                return entry.spec.pinned_device
            placement = self.placement_of(entry.name)
            chosen = _from_placement(view, placement, gpus, free)
            if chosen is not None:
                return chosen
        index = policy.pick_gpu(view, gpus, free)
        if index is None:
            if wanted == "gpu":
                raise InvalidInput(f"{entry.name}: no allowed GPU", field="device")
            return CPU
        if wanted is None and view.allows_cpu() and not self._could_fit(entry, view, index):
            return CPU
        return gpu_device(index)

    def _could_fit(self, entry: ModelEntry, view: policy.ModelView, index: int) -> bool:
        """Whether ``entry`` fits on GPU ``index`` after evictions and preemptions it may make,
        or once models in use there are released."""
        decision = policy.choose_evictions(
            self.table.views_on(gpu_device(index), exclude=entry),
            needed_bytes=view.vram_bytes,
            free_bytes=self.room.room(index, entry.priority),
            priority_rank=entry.rank,
        )
        return isinstance(decision, policy.Evict) or bool(decision.busy)


def _from_placement(
    view: policy.ModelView,
    placement: Placement | None,
    gpus: list[int],
    free: dict[int, int],
) -> str | None:
    """The device a profile's placement names for ``view`` now; None: no opinion."""
    if placement is None or placement.kind is PlacementKind.UNLOADED:
        return None
    if placement.kind is PlacementKind.CPU:
        return CPU
    if placement.kind is PlacementKind.DEVICE and placement.device_index in gpus:
        return gpu_device(placement.device_index or 0)
    index = policy.pick_gpu(view, gpus, free)
    if index is None:
        return CPU if view.allows_cpu() else None
    if placement.kind is PlacementKind.GPU_IF_FREE:
        room = free.get(index, 0)
        if (room <= placement.min_free_bytes or room < view.vram_bytes) and view.allows_cpu():
            return CPU
    return gpu_device(index)
