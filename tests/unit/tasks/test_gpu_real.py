"""On a real NVIDIA GPU (``pytest -m gpu``; skipped elsewhere): a task sees exactly the GPU it
was given. The task asks the CUDA driver itself (libcuda through ctypes, no torch needed) how
many devices it sees and the UUID of device 0; that must be one device, the UUID NVML reports
for the GPU the scheduler chose, and the task's VRAM must be reserved in the arbiter on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.clock import SystemClock
from vramancer.devices.ids import DeviceId
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.tasks.model import TaskState
from vramancer.tasks.service import TaskService
from vramancer.tasks.settings import TasksSettings

CUDA_PROBE = r"""
import ctypes, os
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0, "cuInit failed"
count = ctypes.c_int()
cuda.cuDeviceGetCount(ctypes.byref(count))
dev = ctypes.c_int()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
raw = (ctypes.c_char * 16)()
cuda.cuDeviceGetUuid(raw, dev)
h = bytes(raw).hex()
print(os.environ["CUDA_VISIBLE_DEVICES"], count.value,
      f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}")
"""


class _NoMemory:
    def warmup(self, max_blocks: int) -> int:
        return 0

    def compress_cold(self, max_blocks: int) -> int:
        return 0


@pytest.mark.gpu
async def test_a_task_sees_exactly_its_gpu(tmp_path: Path) -> None:
    clock = SystemClock()
    events = EventBus()
    metrics = Metrics(node="gpu-test")
    devices = DeviceManager(
        DevicesSettings(backends=["nvidia"]), events=events, metrics=metrics, clock=clock
    )
    await devices.start()
    arbiter = Arbiter(
        ArbiterSettings(), devices=devices, events=events, metrics=metrics, clock=clock
    )
    await arbiter.start()
    svc = TaskService(
        TasksSettings(max_retries=0),
        data_dir=tmp_path / "data",
        devices=devices,
        arbiter=arbiter,
        memory=_NoMemory(),
        events=events,
        metrics=metrics,
        clock=clock,
    )
    await svc.start(dispatch=False)
    try:
        snapshot = devices.snapshot()
        target = snapshot.gpus[-1]  # the last GPU: not the one a default CUDA program picks
        sub = await svc.submit(
            {
                "type": "cmd",
                "cmd": [sys.executable, "-c", CUDA_PROBE],
                "gpu": target.index,
                "vram": "256MiB",
                "timeout": 120,
            }
        )
        await svc.run_once()
        assert arbiter.reserved_bytes(DeviceId.gpu(target.index)) == 256 * 1024**2
        await svc.drain(timeout_s=120)
        record = await svc.status(sub.task_id)
        assert record.state is TaskState.DONE, (record.error, record.stderr_tail)
        visible, count, uuid = record.stdout_tail.split()
        assert visible == str(target.cuda_index)
        assert count == "1"
        assert uuid == target.uuid
        assert arbiter.reserved_bytes(DeviceId.gpu(target.index)) == 0
    finally:
        await svc.stop()
        await arbiter.stop()
        await devices.stop()
