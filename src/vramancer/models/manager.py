"""PLACEHOLDER (issue 4 replaces it): the model manager."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import Clock
from vramancer.devices.manager import DeviceManager
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics

if TYPE_CHECKING:
    from vramancer.config import Settings


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        *,
        devices: DeviceManager,
        arbiter: Arbiter,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
