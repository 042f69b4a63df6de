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
