"""Fixtures for device tests: a DeviceManager built with injected backends and a manual clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from vramancer.clock import ManualClock
from vramancer.devices.backend import GpuBackend
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics

MakeManager = Callable[..., DeviceManager]


@pytest.fixture
def make_manager() -> MakeManager:
    """``make_manager(openers={...}, simulated=[...], **settings)``: no real driver is probed
    unless an opener is given for it."""

    def make(
        openers: Mapping[str, Callable[[], GpuBackend | None]] | None = None,
        clock: ManualClock | None = None,
        **settings: Any,
    ) -> DeviceManager:
        return DeviceManager(
            DevicesSettings(**settings),
            events=EventBus(),
            metrics=Metrics(node="testnode"),
            clock=clock or ManualClock(),
            openers=dict(openers or {}),
        )

    return make
