"""After an unload on a real GPU the manager waits until the freed VRAM shows as free in the
telemetry before the next load there (what Ollama calls its VRAM recovery wait), bounded by
``vram_recovery_timeout_s``.

No GPU here: a device double reports one NVIDIA GPU whose memory comes back only some polls
after the backend released it, as CUDA drivers do; the backend double only moves that counter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from tests.unit.models.conftest import FAST_GM
from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.types import Allocation, AllocationRequest, Priority, WorkloadType
from vramancer.clock import ManualClock
from vramancer.config import Settings
from vramancer.devices.ids import DeviceId
from vramancer.devices.manager import VramInfo
from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
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
from vramancer.models.types import BackendKind
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB, MIB

TOTAL = 12 * GIB
HOST = HostSnapshot(
    cpu_count=2,
    cpu_utilization_ratio=0.0,
    memory_total_bytes=16 * GIB,
    memory_available_bytes=8 * GIB,
    memory_used_bytes=8 * GIB,
    swap_total_bytes=0,
    swap_used_bytes=0,
)


class LaggingGpu:
    """One real-looking GPU; memory released by a backend shows as free ``lag`` polls later."""

    def __init__(self, lag: int | None, clock: ManualClock | None = None) -> None:
        self.used = 0
        self.lag = lag  # None: never comes back
        self.pending: list[list[int]] = []  # [polls left, bytes]
        self.polls = 0
        #: Each poll takes this long on ``clock`` (a driver read is not free).
        self.clock = clock or ManualClock()
        self.poll_cost_s = 0.05

    def release(self, size: int) -> None:
        if self.lag is not None:
            self.pending.append([self.lag, size])

    def snapshot(self) -> SystemSnapshot:
        gpu = GpuSnapshot(
            index=0,
            uuid="GPU-test",
            name="Test GPU",
            vendor=DeviceVendor.NVIDIA,
            memory_total_bytes=TOTAL,
            memory_used_bytes=self.used,
            memory_free_bytes=TOTAL - self.used,
            cuda_index=0,
        )
        return SystemSnapshot(host=HOST, gpus=(gpu,))

    async def refresh_async(self) -> SystemSnapshot:
        self.polls += 1
        self.clock.advance(self.poll_cost_s)
        for item in self.pending:
            item[0] -= 1
            if item[0] <= 0:
                self.used -= item[1]
        self.pending = [item for item in self.pending if item[0] > 0]
        return self.snapshot()

    def adjust_simulated(self, index: int, delta_used_bytes: int) -> None:
        raise AssertionError("not a simulated GPU")

    def get_vram_info(self, index: int | None = None) -> VramInfo:
        return VramInfo(TOTAL // MIB, self.used // MIB, (TOTAL - self.used) // MIB, "Test GPU", 0)


class CountingBackend:
    """Takes ``vram`` on the GPU at load; gives it to the driver at unload. Records the free
    memory the telemetry showed when each load started."""

    kind = BackendKind.TORCH
    can_move = False
    reload_on_cpu = False
    service: BackendService | None = None

    def __init__(self, spec: ModelSpec, gpu: LaggingGpu, free_at_load: list[tuple[str, int]]):
        self.spec = spec
        self.gpu = gpu
        self.free_at_load = free_at_load
        self.size = int(spec.vram or 0)
        self.loaded = False

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        self.free_at_load.append((self.spec.name, TOTAL - self.gpu.used))
        self.gpu.used += self.size
        self.loaded = True
        return LoadResult(vram_bytes=self.size, size_bytes=self.size)

    async def move(self, target: Target) -> LoadResult:
        raise AssertionError("cannot move")

    async def unload(self) -> None:
        if self.loaded:
            self.loaded = False
            self.gpu.release(self.size)

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


def build(gpu: LaggingGpu, free_at_load: list[tuple[str, int]], **gm: Any) -> ModelManager:
    clock = gpu.clock
    events = EventBus(clock=clock.time)
    metrics = Metrics(node="test")
    factory = "tests.unit.models.tiny:tiny"
    settings = Settings(
        data_dir="/tmp/vramancer-test",
        devices={"backends": []},
        models=[
            {"name": "a", "backend": "torch", "factory": factory, "vram": 7 * GIB},
            {"name": "b", "backend": "torch", "factory": factory, "vram": 7 * GIB},
        ],
        gpu_manager={**FAST_GM, **gm},
    )
    arbiter = Arbiter(settings.arbiter, devices=gpu, events=events, metrics=metrics, clock=clock)

    def backend(spec: ModelSpec) -> ModelBackend:
        return CountingBackend(spec, gpu, free_at_load)

    return ModelManager(
        settings,
        devices=gpu,
        arbiter=arbiter,
        events=events,
        metrics=metrics,
        clock=clock,
        backend_factory=backend,
    )


async def test_the_next_load_waits_until_the_freed_vram_is_back() -> None:
    gpu = LaggingGpu(lag=3)
    free_at_load: list[tuple[str, int]] = []
    m = build(gpu, free_at_load)
    await m.start()
    try:
        await m.ensure_loaded("a", "gpu:0")
        unload = asyncio.create_task(m.ensure_unloaded("a"))
        await asyncio.sleep(0)
        await asyncio.gather(unload, m.ensure_loaded("b", "gpu:0"))
        assert gpu.polls >= 3  # it polled the telemetry until the memory came back
        assert free_at_load == [("a", TOTAL), ("b", TOTAL)]  # b never started on a full GPU
        assert m.device("b") == "gpu:0" and m.state("a").value == "unloaded"
    finally:
        await m.stop()


async def test_the_wait_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    gpu = LaggingGpu(lag=None)  # the driver never gives the memory back
    m = build(gpu, [], vram_recovery_timeout_s=0.2)
    await m.start()
    try:
        await m.ensure_loaded("a", "gpu:0")
        polls, started = gpu.polls, gpu.clock.monotonic()
        with caplog.at_level(logging.WARNING, logger="vramancer.models.room"):
            await m.ensure_unloaded("a")
        # one reading before the unload, then polls of 0.05 s each until 0.2 s have passed on
        # the manager's clock, then no more
        assert gpu.polls - polls == 1 + 4
        assert gpu.clock.monotonic() - started == pytest.approx(0.25)
        assert "7.0 GiB freed but only 0 B more free after 0.2 s" in caplog.text
        assert m.state("a").value == "unloaded"
    finally:
        await m.stop()


async def test_a_preempted_task_is_waited_for_before_the_load() -> None:
    """A background task reserved 8 GiB on the GPU and uses it. A model load preempts it; the
    task is stopped, and its memory comes back some polls later: the load starts only then."""
    gpu = LaggingGpu(lag=3)
    free_at_load: list[tuple[str, int]] = []
    m = build(gpu, free_at_load)
    await m.start()
    try:
        told: list[str] = []

        def stop_task(allocation: Allocation) -> None:
            told.append(allocation.id)
            gpu.release(8 * GIB)  # killed: the driver frees it a little later

        m.arbiter.allocate(
            AllocationRequest(
                WorkloadType.OTHER,
                Priority.BACKGROUND,
                8 * GIB,
                device=DeviceId(0),
                owner="task:t1",
                on_preempt=stop_task,
            )
        )
        gpu.used += 8 * GIB  # the task's process holds what it reserved
        status = await m.ensure_loaded("a", "gpu:0")  # normal beats background
        assert status.device == "gpu:0" and len(told) == 1
        assert free_at_load == [("a", TOTAL)]  # not the 4 GiB free while the task still ran
    finally:
        await m.stop()
