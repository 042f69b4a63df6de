"""What the model manager needs from the devices and the arbiter (Protocols).

``devices.manager.DeviceManager`` and ``arbiter.arbiter.Arbiter`` satisfy them. The manager
uses every method (``headroom()`` for the room on a GPU, ``refresh_async()`` while memory comes
back), so a test double implements the whole Protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vramancer.arbiter.types import Allocation, AllocationRequest, ArbiterState, Priority
from vramancer.devices.ids import DeviceId
from vramancer.devices.manager import VramInfo
from vramancer.devices.types import SystemSnapshot


class DevicePort(Protocol):
    def snapshot(self) -> SystemSnapshot:
        """The latest frozen snapshot (never calls a driver)."""
        ...

    async def refresh_async(self) -> SystemSnapshot:
        """Poll now (used while waiting for VRAM to come back after an unload)."""
        ...

    def adjust_simulated(self, index: int, delta_used_bytes: int) -> None:
        """Account a model on a simulated GPU so telemetry shows it."""
        ...

    def get_vram_info(self, index: int | None = None) -> VramInfo:
        """The ``vram`` of ``/v1/gpu/status`` (MiB, percent) for GPU ``index`` (default: the
        first; zeros when none)."""
        ...


class ArbiterPort(Protocol):
    def allocate(self, request: AllocationRequest) -> Allocation:
        """Grant now or raise ``InsufficientMemory``."""
        ...

    def release_allocation(self, allocation: str) -> None: ...

    def set_preemptible(self, allocation_id: str, preemptible: bool) -> bool:
        """Turn preemption of a live allocation on or off (False: not live)."""
        ...

    def state(self) -> ArbiterState: ...

    def headroom(
        self,
        device: DeviceId | None = None,
        *,
        priority: Priority | None = None,
        spare: Callable[[Allocation], bool] | None = None,
    ) -> int:
        """Bytes a request of ``priority`` on ``device`` could be granted now (a dry run)."""
        ...

    def reclaimable(
        self,
        device: DeviceId | None = None,
        *,
        priority: Priority | None,
        spare: Callable[[Allocation], bool] | None = None,
    ) -> int:
        """Bytes a request of ``priority`` would preempt on ``device``."""
        ...
