"""Room on a GPU, as the telemetry and the arbiter see it, and the waits for memory to show
as free again on a real GPU (drivers report freed memory some polls later).

Room is the smaller of the telemetry's free memory and the arbiter's headroom
(``Arbiter.headroom``, a dry run of its own plan). For a load of a given priority it also
counts what the arbiter would preempt for it, sparing managed models (they are evicted by the
manager's own policy instead): tasks and ``/v1/allocations`` of a lower priority, so a
user-facing model beats a background reservation.
"""

from __future__ import annotations

import asyncio
import logging
import math

from vramancer.arbiter.types import Allocation, Priority
from vramancer.clock import Clock
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import GpuSnapshot
from vramancer.errors import InsufficientMemory, InvalidInput
from vramancer.models import policy
from vramancer.models.backends.base import Target
from vramancer.models.entry import MODEL_OWNER, ModelEntry
from vramancer.models.ports import ArbiterPort, DevicePort
from vramancer.models.settings import GpuManagerSettings
from vramancer.models.types import gpu_index
from vramancer.units import MIB, format_size

log = logging.getLogger(__name__)

#: A freed GPU counts as recovered when this share of the freed bytes shows as free again.
RECOVERED_SHARE = 0.9
#: Other allocation holders a "not enough VRAM" message names.
HOLDERS_SHOWN = 5


def is_model(allocation: Allocation) -> bool:
    """An allocation of a managed model (the manager evicts those in its own order)."""
    return (allocation.owner or "").startswith(MODEL_OWNER)


class GpuRoom:
    def __init__(
        self, gm: GpuManagerSettings, *, devices: DevicePort, arbiter: ArbiterPort, clock: Clock
    ) -> None:
        self.gm = gm
        self.devices = devices
        self.arbiter = arbiter
        #: Bounds the wait for freed memory (``vram_recovery_timeout_s``).
        self.clock = clock

    def target(self, device: str) -> Target:
        """Where ``device`` (``cpu`` / ``gpu:N``) puts a model's tensors."""
        index = gpu_index(device)
        if index is None:
            return Target.cpu()
        gpu = self.devices.snapshot().gpu(index)
        if gpu is None:
            raise InvalidInput(f"device {device} does not exist", field="device")
        return Target(
            device=device,
            runs_on=gpu.torch_device,
            simulated=gpu.simulated,
            cuda_index=gpu.cuda_index,
        )

    def room(self, index: int, priority: Priority | None = None) -> int:
        """Free bytes on GPU ``index`` (see the module docstring): the telemetry's free memory,
        bounded by the arbiter's headroom there. On a real GPU the memory of lower-priority
        holders naming it shows as used in the telemetry and comes back once they stop
        (``wait_room`` waits for it); a simulated GPU's telemetry never had it."""
        gpu = self.devices.snapshot().gpu(index)
        device = DeviceId(index)
        free = gpu.memory_free_bytes if gpu is not None else 0
        if gpu is not None and not gpu.simulated and priority is not None:
            free += self.arbiter.reclaimable(device, priority=priority, spare=is_model)
        return min(free, self.arbiter.headroom(device, priority=priority, spare=is_model))

    def free_now(self, index: int | None) -> int:
        """The telemetry's free memory on GPU ``index`` (0 for the CPU or a GPU gone)."""
        if index is None:
            return 0
        gpu = self.devices.snapshot().gpu(index)
        return gpu.memory_free_bytes if gpu is not None else 0

    # ------------------------------------------------------------------ "no room"

    def no_room(
        self, entry: ModelEntry, device: str, decision: policy.NoRoom
    ) -> InsufficientMemory:
        """The 409 of a load that does not fit: free MB (now, without preempting anything),
        needed MB, the models that could be unloaded, and the other arbiter allocations (tasks,
        ``/v1/allocations``) that hold memory there."""
        index = gpu_index(device)
        free = max(0, self.room(index) if index is not None else decision.free_bytes)
        needed_mb, free_mb = decision.needed_bytes // MIB, free // MIB
        names = list(decision.unloadable)
        hint = f"; unloading {', '.join(names)} could make room" if names else ""
        held = self._other_holders(device)
        if held:
            shown = ", ".join(
                f"{a.owner or a.id} {format_size(a.memory_bytes)} ({a.priority.value})"
                for a in held[:HOLDERS_SHOWN]
            )
            more = f" and {len(held) - HOLDERS_SHOWN} more" if len(held) > HOLDERS_SHOWN else ""
            hint += f"; other allocations hold memory: {shown}{more}"
        return InsufficientMemory(
            f"not enough VRAM on {device} for {entry.name}: needs "
            f"{format_size(decision.needed_bytes)}, {format_size(free)} free{hint}",
            model=entry.name,
            device=device,
            needed_mb=needed_mb,
            free_mb=free_mb,
            requested_bytes=decision.needed_bytes,
            available_bytes=free,
            could_unload=names,
            held_by=[
                {
                    "id": a.id,
                    "owner": a.owner,
                    "memory_bytes": a.memory_bytes,
                    "priority": a.priority.value,
                }
                for a in held
            ],
        )

    def _other_holders(self, device: str) -> list[Allocation]:
        """Arbiter allocations that are not managed models and count against ``device``
        (naming it, or no device: they count against the whole budget), biggest first."""
        key = str(DeviceId.parse(device))
        others = [
            a
            for a in self.arbiter.state().allocations
            if a.device in (key, None) and not is_model(a)
        ]
        return sorted(others, key=lambda a: (-a.memory_bytes, a.seq))

    # ------------------------------------------------------------------ waits on real GPUs

    async def wait_recovered(self, index: int, before: int, freed: int) -> None:
        """After an unload, poll telemetry until the freed VRAM shows as free (bounded)."""
        short = await self._wait_free(index, before + int(freed * RECOVERED_SHARE))
        if short is not None:
            log.warning(
                "gpu:%d: %s freed but only %s more free after %.1f s; going on",
                index,
                format_size(freed),
                format_size(short.memory_free_bytes - before),
                self.gm.vram_recovery_timeout_s,
            )

    async def wait_room(self, entry: ModelEntry, index: int, needed: int) -> None:
        """Before a load on a real GPU: the holders the arbiter just preempted for it (a task
        being stopped) may still hold their memory; poll until ``needed`` is free (bounded)."""
        gpu = self.devices.snapshot().gpu(index)
        if gpu is None or gpu.simulated or gpu.memory_free_bytes >= needed:
            return
        short = await self._wait_free(index, needed)
        if short is not None:
            log.warning(
                "gpu:%d: %s needs %s but only %s is free after %.1f s; loading anyway",
                index,
                entry.name,
                format_size(needed),
                format_size(short.memory_free_bytes),
                self.gm.vram_recovery_timeout_s,
            )

    async def _wait_free(self, index: int, goal: int) -> GpuSnapshot | None:
        """Poll GPU ``index`` until ``goal`` bytes are free, at most ``vram_recovery_timeout_s``.
        None when reached (or the GPU is gone); the last reading when the time ran out."""
        timeout_s, poll_s = self.gm.vram_recovery_timeout_s, self.gm.vram_recovery_poll_s
        deadline = self.clock.monotonic() + timeout_s
        # The sleeps alone reach the timeout after this many polls: a bound that holds even on
        # a clock that does not move (tests), and never comes first on the real one.
        polls_left = math.ceil(timeout_s / poll_s) + 1
        while True:
            snap = await self.devices.refresh_async()
            gpu = snap.gpu(index)
            if gpu is None or gpu.memory_free_bytes >= goal:
                return None
            polls_left -= 1
            if self.clock.monotonic() >= deadline or polls_left <= 0:
                return gpu
            await asyncio.sleep(self.gm.vram_recovery_poll_s)
