"""PLACEHOLDER (issue 2 replaces it): seed 001 ResourceOrchestrator."""

from __future__ import annotations

from typing import Any

from vramancer.devices.manager import DeviceManager
from vramancer.observability.metrics import Metrics
from vramancer.resources.settings import ResourcesSettings


class ResourceOrchestrator:
    def __init__(
        self, settings: ResourcesSettings, devices: DeviceManager, *, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.devices = devices
        self.metrics = metrics
        self.models: Any = None

    def attach_models(self, models: Any) -> None:
        """Give optimize_resources() the model manager (unload idle models, smaller variants)."""
        self.models = models
