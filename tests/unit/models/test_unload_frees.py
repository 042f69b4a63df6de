"""Property: unloading a model frees its VRAM, as the GPU itself reports it.

The manager's own accounts (``freed_bytes``, ``used_vram_bytes``, simulated counters it moves
itself) cannot show an unload that frees nothing, so this property reads the device: two fake
NVIDIA GPUs (``tests/fakes/nvml.py``) read through the real ``NvidiaBackend`` and
``DeviceManager``, and a backend that really takes its model's size in the fake device's used
memory at load and gives it back at unload. After every operation the used memory NVML reports
on each GPU must be what the models the manager calls loaded there hold, and every unload must
make it drop by at least the model's size. A backend whose unload keeps the memory makes the
property fail (``test_a_backend_that_keeps_the_memory_is_caught``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.nvml import FakeGpu, FakeNvml
from tests.unit.models.conftest import FAST_GM, QuietHost
from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import ManualClock
from vramancer.config import Settings
from vramancer.devices.manager import DeviceManager
from vramancer.devices.nvidia import NvidiaBackend
from vramancer.errors import InsufficientMemory
from vramancer.events import EventBus
from vramancer.models.backends.base import (
    BackendService,
    LoadResult,
    ModelBackend,
    RequestInfo,
    RunningModel,
    Target,
)
from vramancer.models.manager import ModelManager
from vramancer.models.settings import ModelSpec
from vramancer.models.types import BackendKind, ModelState, gpu_index
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB

GPU_TOTAL = 16 * GIB
SIZES = {"a": 5 * GIB, "b": 7 * GIB, "c": 9 * GIB}


class DeviceHeldBackend:
    """Holds its model's size in the fake GPU's used memory while loaded on it. With
    ``releases=False`` its unload reports success but the memory stays taken (a leak)."""

    kind = BackendKind.TORCH
    can_move = False
    reload_on_cpu = False
    service: BackendService | None = None

    def __init__(self, spec: ModelSpec, nvml: FakeNvml, *, releases: bool) -> None:
        self.size = int(spec.vram or 0)
        self.nvml = nvml
        self.releases = releases
        self.held: FakeGpu | None = None

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        index = gpu_index(target.device)
        if index is not None:
            self.held = self.nvml.gpus[index]
            self.held.used += self.size
        return LoadResult(vram_bytes=self.size, size_bytes=self.size)

    async def move(self, target: Target) -> LoadResult:
        raise AssertionError("cannot move in place")

    async def unload(self) -> None:
        if self.held is not None and self.releases:
            self.held.used -= self.size
        self.held = None

    def handle(self) -> Any:
        return None

    def request_info(self) -> RequestInfo:
        return RequestInfo()

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        return None

    async def estimate_vram(self) -> int | None:
        return None

    async def close(self) -> None:
        return None


@asynccontextmanager
async def nvml_manager(*, releases: bool) -> AsyncIterator[tuple[ModelManager, DeviceManager]]:
    """The real device manager over two fake NVIDIA GPUs, the real arbiter, the manager."""
    nvml = FakeNvml([FakeGpu("GPU-0", total=GPU_TOTAL), FakeGpu("GPU-1", total=GPU_TOTAL)])
    factory = "tests.unit.models.tiny:tiny"
    config = Settings(
        data_dir="/tmp/vramancer-test",
        devices={"backends": ["nvidia"], "simulated": []},
        models=[
            {"name": name, "backend": "torch", "factory": factory, "vram": size}
            for name, size in SIZES.items()
        ],
        gpu_manager={**FAST_GM, "vram_recovery_timeout_s": 0.05},
    )
    clock = ManualClock()
    events = EventBus(clock=clock.time)
    metrics = Metrics(node="test")
    devices = DeviceManager(
        config.devices,
        events=events,
        metrics=metrics,
        clock=clock,
        openers={"nvidia": lambda: NvidiaBackend.open(nvml)},
        host_reader=QuietHost(),
    )
    arbiter = Arbiter(config.arbiter, devices=devices, events=events, metrics=metrics, clock=clock)

    def backend(spec: ModelSpec) -> ModelBackend:
        return DeviceHeldBackend(spec, nvml, releases=releases)

    models = ModelManager(
        config,
        devices=devices,
        arbiter=arbiter,
        events=events,
        metrics=metrics,
        clock=clock,
        backend_factory=backend,
    )
    await devices.refresh_async()
    assert [g.simulated for g in devices.snapshot().gpus] == [False, False]
    await arbiter.start()
    await models.start()
    try:
        yield models, devices
    finally:
        await models.stop()
        await arbiter.stop()
        await devices.stop()


async def reported_used(devices: DeviceManager) -> dict[int, int]:
    """Used memory per GPU as NVML reports it now (a fresh poll)."""
    snap = await devices.refresh_async()
    return {g.index: g.memory_used_bytes for g in snap.gpus}


async def held_as_reported(models: ModelManager, devices: DeviceManager) -> list[str]:
    """Violations of "NVML shows what the loaded models hold" on every GPU."""
    used = await reported_used(devices)
    problems = []
    for index, reported in used.items():
        here = [
            s.name
            for s in models.list_models()
            if s.state is ModelState.LOADED and s.device == f"gpu:{index}"
        ]
        expected = sum(SIZES[name] for name in here)
        if reported != expected:
            problems.append(
                f"gpu:{index} reports {reported} B used, the loaded {here} hold {expected}"
            )
    return problems


async def unload_frees(models: ModelManager, devices: DeviceManager, name: str) -> list[str]:
    """Unload ``name``; a violation when it was on a GPU and the used memory NVML reports
    there did not drop by at least its size."""
    index = gpu_index(models.status(name).device)
    before = await reported_used(devices)
    await models.ensure_unloaded(name)
    after = await reported_used(devices)
    if index is None:
        return []
    freed = before[index] - after[index]
    if freed < SIZES[name]:
        return [f"unloading {name} freed {freed} B on gpu:{index}, it held {SIZES[name]}"]
    return []


Op = tuple[str, str, str]


async def run_ops(ops: Sequence[Op], *, releases: bool) -> list[str]:
    """Apply ``ops`` one by one (load NAME on DEVICE, or unload NAME) and collect every
    violation of the property, as the devices report it."""
    problems: list[str] = []
    async with nvml_manager(releases=releases) as (models, devices):
        for kind, name, device in ops:
            if kind == "unload":
                problems += await unload_frees(models, devices, name)
            else:
                with contextlib.suppress(InsufficientMemory):  # no room: an answer, no violation
                    await models.migrate(name, device)  # loads an unloaded model there
            problems += await held_as_reported(models, devices)
        for name in SIZES:
            problems += await unload_frees(models, devices, name)
    return problems


ops = st.lists(
    st.tuples(
        st.sampled_from(["load", "unload"]),
        st.sampled_from(sorted(SIZES)),
        st.sampled_from(["gpu:0", "gpu:1", "cpu"]),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=ops)
def test_unloading_frees_the_vram_the_device_reports(ops: list[Op]) -> None:
    assert asyncio.run(run_ops(ops, releases=True)) == []


async def test_a_backend_that_keeps_the_memory_is_caught() -> None:
    """The property sees an unload that frees nothing, though the manager's accounts (its
    state, its arbiter booking, the ``freed_bytes`` it publishes) say it was freed."""
    problems = await run_ops([("load", "b", "gpu:0"), ("unload", "b", "")], releases=False)
    assert f"unloading b freed 0 B on gpu:0, it held {SIZES['b']}" in problems
    assert any(p.startswith("gpu:0 reports") for p in problems)


@pytest.mark.parametrize("releases", [True, False])
async def test_evictions_are_measured_too(releases: bool) -> None:
    """A load that evicts: with a leaking backend the evicted model's memory stays taken."""
    problems = await run_ops(
        [("load", "b", "gpu:0"), ("load", "c", "gpu:0"), ("load", "a", "gpu:0")],
        releases=releases,
    )
    assert (problems == []) is releases
