"""Fixtures of the model-manager tests: a fake Ollama, and a harness wiring the real device
manager (simulated GPUs only), the real arbiter and a model manager on a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama
from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import ManualClock
from vramancer.config import Settings
from vramancer.devices.host import HostReader
from vramancer.devices.manager import DeviceManager
from vramancer.devices.types import HostSnapshot
from vramancer.events import Event, EventBus
from vramancer.models.manager import ModelManager
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB

VLM = "qwen3-vl:8b"
CLIP = "clip"
VLM_SIZE = int(10.5 * GIB)
TINY = "tests.unit.models.tiny:tiny"

#: Fast defaults for tests: no backoff, short waits.
FAST_GM: dict[str, Any] = {
    "retry_backoff_s": 0.0,
    "vram_recovery_timeout_s": 0.5,
    "vram_recovery_poll_s": 0.01,
    "queue_max_wait_s": 5.0,
    "tick_s": 3600.0,
}


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama({VLM: VLM_SIZE, "small:1b": "1GiB", "tiny:0.5b": "512MiB"}) as fake:
        yield fake


def seed_settings(ollama_url: str, tmp: Any = None, **overrides: Any) -> Settings:
    """The recording set-up: a 12 GiB simulated GPU, the VLM on Ollama, CLIP as a torch model."""
    models = overrides.pop(
        "models",
        [
            {
                "name": VLM,
                "backend": "ollama",
                "vram": VLM_SIZE,
                "priority": "user_facing",
                "allowed_devices": ["gpu"],
            },
            {"name": CLIP, "backend": "torch", "factory": TINY, "vram": "500MiB"},
        ],
    )
    names = {m["name"] for m in models}
    roles = {
        "vlm_model": VLM if VLM in names else None,
        "clip_model": CLIP if CLIP in names else None,
    }
    gm = {**roles, **FAST_GM, **overrides.pop("gpu_manager", {})}
    devices = overrides.pop(
        "devices", {"backends": [], "simulated": [{"name": "sim0", "memory": "12GiB"}]}
    )
    return Settings(
        data_dir=tmp or "/tmp/vramancer-test",
        ollama={"endpoint": ollama_url, "retry_interval_s": 30.0},
        models=models,
        gpu_manager=gm,
        devices=devices,
        **overrides,
    )


class QuietHost(HostReader):
    """The host without the 0.1 s CPU-utilisation window (tests build many managers)."""

    def read(self, taken_at: float) -> HostSnapshot:
        return HostSnapshot(
            cpu_count=2,
            cpu_utilization_ratio=0.0,
            memory_total_bytes=16 * GIB,
            memory_available_bytes=8 * GIB,
            memory_used_bytes=8 * GIB,
            swap_total_bytes=0,
            swap_used_bytes=0,
            taken_at=taken_at,
        )


@dataclass
class Harness:
    settings: Settings
    clock: ManualClock
    events: EventBus
    metrics: Metrics
    devices: DeviceManager
    arbiter: Arbiter
    models: ModelManager
    seen: list[Event] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.seen]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.seen if e.kind == kind]

    def gpu_used(self, index: int = 0) -> int:
        gpu = self.devices.snapshot().gpu(index)
        assert gpu is not None
        return gpu.memory_used_bytes

    def gpu_free(self, index: int = 0) -> int:
        gpu = self.devices.snapshot().gpu(index)
        assert gpu is not None
        return gpu.memory_free_bytes


@asynccontextmanager
async def harness(settings: Settings, **kwargs: Any) -> AsyncIterator[Harness]:
    clock = ManualClock()
    events = EventBus(clock=clock.time)
    metrics = Metrics(node="test")
    devices = DeviceManager(
        settings.devices, events=events, metrics=metrics, clock=clock, host_reader=QuietHost()
    )
    arbiter = Arbiter(
        settings.arbiter, devices=devices, events=events, metrics=metrics, clock=clock
    )
    models = ModelManager(
        settings,
        devices=devices,
        arbiter=arbiter,
        events=events,
        metrics=metrics,
        clock=clock,
        **kwargs,
    )
    h = Harness(settings, clock, events, metrics, devices, arbiter, models)
    events.subscribe(h.seen.append)
    devices.refresh()
    await arbiter.start()
    await models.start()
    try:
        yield h
    finally:
        await models.stop()
        await arbiter.stop()
        await devices.stop()


HarnessFactory = Callable[..., Any]
