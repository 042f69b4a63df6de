"""PLACEHOLDER (issue 4 replaces it): the VRAM arbiter."""

from __future__ import annotations

from vramancer.arbiter.settings import ArbiterSettings
from vramancer.clock import Clock
from vramancer.devices.manager import DeviceManager
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics


class Arbiter:
    def __init__(
        self,
        settings: ArbiterSettings,
        *,
        devices: DeviceManager,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


# Interface the models and tasks issues code against (the arbiter issue implements it):
#   request_allocation(workload_type, priority, memory, *, min_quality=None, device=None,
#                      owner=None, on_preempt=None) -> Allocation   (raises InsufficientMemory)
#   release_allocation(allocation_id) -> None
#   recommended_quality(workload_type) -> float
#   reserved_bytes(device) -> int         (what tasks' picker subtracts from free VRAM)
#   state() -> ArbiterState;  stats() -> dict
