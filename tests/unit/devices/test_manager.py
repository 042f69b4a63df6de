"""DeviceManager: discovery order, cached snapshots, errors, simulated devices, the VRAM
monitor, events, metrics and the asyncio poller."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.fakes.nvml import NVML_ERROR_GPU_IS_LOST, FakeGpu, FakeNvml
from tests.promtext import metric_value
from tests.unit.devices.conftest import MakeManager
from vramancer.devices.backend import GpuBackend
from vramancer.devices.monitor import VramChange
from vramancer.devices.nvidia import NvidiaBackend
from vramancer.devices.types import DeviceVendor, GpuSnapshot
from vramancer.errors import InvalidInput, NotFound

GIB = 1024**3
MIB = 1024**2
SIMS = [{"name": "sim0", "memory": "24GiB"}, {"name": "sim1", "memory": "12GiB", "used": "1GiB"}]


def nvidia_opener(nvml: FakeNvml):  # type: ignore[no-untyped-def]
    return lambda: NvidiaBackend.open(nvml)


def test_real_gpus_come_first_then_simulated_ones(make_manager: MakeManager) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a"), FakeGpu("GPU-b", used=2 * GIB)])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)}, simulated=SIMS)
    snap = manager.refresh()
    assert [(g.index, g.uuid, g.vendor) for g in snap.gpus] == [
        (0, "GPU-a", DeviceVendor.NVIDIA),
        (1, "GPU-b", DeviceVendor.NVIDIA),
        (2, "sim-sim0", DeviceVendor.SIMULATED),
        (3, "sim-sim1", DeviceVendor.SIMULATED),
    ]
    assert manager.real_gpu_count == 2
    assert snap.gpu(3) is not None and snap.gpu(3).memory_used_bytes == GIB  # type: ignore[union-attr]
    assert [g.simulated for g in snap.gpus] == [False, False, True, True]
    assert not snap.cpu_only


def test_no_gpu_is_cpu_only_mode_logged_once(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(openers={"nvidia": lambda: None, "amd": lambda: None})
    with caplog.at_level(logging.INFO, logger="vramancer.devices.manager"):
        snap = manager.refresh()
        manager.refresh()
    assert snap.cpu_only and snap.gpus == ()
    assert snap.host.memory_total_bytes > 0
    assert [r.getMessage() for r in caplog.records if "CPU-only" in r.getMessage()] == [
        "no GPU found: CPU-only mode"
    ]


def test_a_backend_that_blows_up_while_probing_is_skipped(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> GpuBackend | None:
        raise OSError("driver exploded")

    manager = make_manager(openers={"nvidia": broken}, simulated=SIMS[:1])
    with caplog.at_level(logging.ERROR):
        snap = manager.refresh()
    assert [g.uuid for g in snap.gpus] == ["sim-sim0"]
    assert "probing nvidia GPUs failed" in caplog.text


def test_only_configured_backends_are_probed(make_manager: MakeManager) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)}, backends=["amd"])
    assert manager.refresh().gpus == ()
    assert nvml.calls == []


def test_snapshot_reads_the_cache_and_never_the_driver(make_manager: MakeManager) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)})
    first = manager.snapshot()  # the very first read polls once
    calls = len(nvml.calls)
    nvml.gpus[0].used = 5 * GIB
    for _ in range(5):
        assert manager.snapshot() is first
    assert len(nvml.calls) == calls
    assert manager.refresh().gpus[0].memory_used_bytes == 5 * GIB


def test_a_failed_read_keeps_the_last_good_values_marks_the_error_and_recovers(
    make_manager: MakeManager,
) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a", used=3 * GIB)])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)})
    manager.refresh()
    nvml.fail["nvmlDeviceGetMemoryInfo"] = NVML_ERROR_GPU_IS_LOST
    failed = manager.refresh().gpus[0]
    assert failed.error is not None and "nvmlDeviceGetMemoryInfo" in failed.error
    assert failed.memory_used_bytes == 3 * GIB
    text = manager.metrics.render().decode()
    assert 'vramancer_gpu_up{backend="nvidia",device="GPU-a",node="testnode"} 0.0' in text
    assert (
        'vramancer_device_poll_errors_total{backend="nvidia",device="GPU-a",node="testnode"} 1.0'
        in text
    )
    del nvml.fail["nvmlDeviceGetMemoryInfo"]
    assert manager.refresh().gpus[0].error is None
    changes = [e.data["change"] for e in manager.events.recent(kind="device_changed")]
    assert changes == ["added", "error", "recovered"]


class _BrokenBinding:
    """A vendor binding whose second device raises an untyped error (a binding bug)."""

    vendor = DeviceVendor.AMD

    def __init__(self) -> None:
        self.used = GIB
        self.broken = False

    def device_count(self) -> int:
        return 2

    def read(self, local_index: int) -> GpuSnapshot:
        if local_index == 1 and self.broken:
            raise KeyError("vram_total")
        return GpuSnapshot(
            index=local_index, uuid=f"amd-{local_index}", name="AMD", vendor=DeviceVendor.AMD,
            memory_total_bytes=8 * GIB, memory_used_bytes=self.used,
            memory_free_bytes=8 * GIB - self.used,
        )  # fmt: skip

    def close(self) -> None:
        return None


def test_an_unexpected_error_of_one_device_spares_the_others_and_is_logged_once(
    make_manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    binding = _BrokenBinding()
    manager = make_manager(openers={"amd": lambda: binding}, backends=["amd"], simulated=SIMS[:1])
    manager.refresh()
    binding.broken, binding.used = True, 3 * GIB
    with caplog.at_level(logging.WARNING, logger="vramancer.devices.manager"):
        for _ in range(3):
            snap = manager.refresh()
    good, bad, sim = snap.gpus
    assert good.error is None and good.memory_used_bytes == 3 * GIB  # still polled
    assert bad.error == "KeyError: 'vram_total'" and bad.memory_used_bytes == GIB  # last good
    assert sim.simulated and sim.error is None
    failures = [r for r in caplog.records if "reading amd GPU 1 failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # once, with the traceback
    text = manager.metrics.render().decode()
    assert metric_value(text, "vramancer_device_poll_errors_total", device="amd-1") == 3


def test_adjust_simulated_shows_up_immediately(make_manager: MakeManager) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)}, simulated=SIMS)
    manager.refresh()
    calls = len(nvml.calls)
    manager.adjust_simulated(1, 4 * GIB)
    snap = manager.snapshot()
    sim0 = snap.gpu(1)
    assert sim0 is not None
    assert (sim0.memory_used_bytes, sim0.memory_free_bytes) == (4 * GIB, 20 * GIB)
    assert len(nvml.calls) == calls  # no driver call
    manager.adjust_simulated(1, -10 * GIB)  # clamped at 0
    assert manager.snapshot().gpus[1].memory_used_bytes == 0
    manager.adjust_simulated(2, 100 * GIB)  # clamped at total
    assert manager.snapshot().gpus[2].memory_free_bytes == 0
    text = manager.metrics.render().decode()
    assert (
        'vramancer_gpu_memory_free_bytes{backend="simulated",device="sim-sim1",node="testnode"} 0.0'
        in text
    )


def test_only_simulated_devices_can_be_adjusted(make_manager: MakeManager) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)}, simulated=SIMS[:1])
    with pytest.raises(NotFound, match="device 0 is not a simulated device"):
        manager.adjust_simulated(0, GIB)
    with pytest.raises(NotFound):
        manager.adjust_simulated(5, GIB)


def test_set_simulated_sets_readings_and_refuses_impossible_ones(make_manager: MakeManager) -> None:
    manager = make_manager(simulated=SIMS)
    manager.set_simulated(0, used_bytes=10 * GIB, utilization_ratio=0.5, temperature_celsius=70)
    gpu = manager.snapshot().gpus[0]
    assert (gpu.memory_used_bytes, gpu.utilization_ratio, gpu.temperature_celsius) == (
        10 * GIB,
        0.5,
        70.0,
    )
    with pytest.raises(InvalidInput, match="used_bytes"):
        manager.set_simulated(1, used_bytes=13 * GIB)
    with pytest.raises(InvalidInput, match="utilization_ratio"):
        manager.set_simulated(1, utilization_ratio=1.5)
    assert manager.snapshot().gpus[1].memory_used_bytes == GIB


def test_vram_monitor_fires_past_the_threshold_and_accumulates_drift(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(simulated=SIMS)
    manager.refresh()
    seen: list[VramChange] = []
    unsubscribe = manager.on_vram_changed(seen.append, threshold_bytes=100 * MIB)
    manager.adjust_simulated(0, 60 * MIB)  # 60 MiB: below
    assert seen == []
    manager.adjust_simulated(0, 60 * MIB)  # 120 MiB since the baseline: fires
    assert [(c.uuid, c.delta_free_bytes) for c in seen] == [("sim-sim0", -120 * MIB)]
    manager.adjust_simulated(0, -100 * MIB)  # exactly the threshold: not "more than"
    assert len(seen) == 1
    manager.adjust_simulated(1, 2 * GIB)
    assert [(c.index, c.free_before_bytes, c.free_after_bytes) for c in seen[1:]] == [
        (1, 11 * GIB, 9 * GIB)
    ]
    assert seen[1].simulated and seen[1].backend == "simulated"
    unsubscribe()
    manager.adjust_simulated(1, 2 * GIB)
    assert len(seen) == 2


def test_vram_changed_events_use_the_configured_threshold(make_manager: MakeManager) -> None:
    manager = make_manager(simulated=SIMS[:1], vram_change_threshold="1GiB")
    manager.refresh()
    manager.adjust_simulated(0, 512 * MIB)
    assert manager.events.recent(kind="vram_changed") == []
    manager.adjust_simulated(0, 1024 * MIB)
    (event,) = manager.events.recent(kind="vram_changed")
    assert event.data["uuid"] == "sim-sim0"
    assert event.data["delta_free_bytes"] == -1536 * MIB
    assert event.data["simulated"] is True


def test_a_failing_callback_does_not_stop_the_others(make_manager: MakeManager) -> None:
    manager = make_manager(simulated=SIMS[:1])
    manager.refresh()
    seen: list[int] = []

    def bad(change: VramChange) -> None:
        raise RuntimeError("subscriber bug")

    manager.on_vram_changed(bad, threshold_bytes=0)
    manager.on_vram_changed(lambda c: seen.append(c.free_after_bytes), threshold_bytes=0)
    manager.adjust_simulated(0, GIB)
    assert seen == [23 * GIB]


def test_host_metrics_and_poll_duration_are_exported(make_manager: MakeManager) -> None:
    manager = make_manager()
    snap = manager.refresh()
    text = manager.metrics.render()
    host = {"backend": "host", "device": "host", "node": "testnode"}
    assert metric_value(text, "vramancer_host_memory_available_bytes", **host) == float(
        snap.host.memory_available_bytes
    )
    assert metric_value(text, "vramancer_host_memory_total_bytes", **host) == float(
        snap.host.memory_total_bytes
    )
    assert metric_value(text, "vramancer_device_poll_duration_seconds_count", node="testnode") == 1


def test_get_vram_info_in_the_seed_shape(make_manager: MakeManager) -> None:
    manager = make_manager(simulated=SIMS[1:])
    info = manager.get_vram_info()
    assert (info.total_mb, info.used_mb, info.free_mb) == (12 * 1024, 1024, 11 * 1024)
    assert info.gpu_name == "Simulated GPU sim1"
    assert manager.get_available_vram_mb(0) == 11 * 1024
    with pytest.raises(NotFound):
        manager.get_vram_info(7)
    assert make_manager().get_vram_info().total_mb == 0


async def test_the_poller_refreshes_in_the_background_and_stop_releases_the_driver(
    make_manager: MakeManager,
) -> None:
    nvml = FakeNvml([FakeGpu("GPU-a", used=GIB)])
    manager = make_manager(openers={"nvidia": nvidia_opener(nvml)}, poll_interval_s=0.02)
    await manager.start()
    assert manager.snapshot().gpus[0].memory_used_bytes == GIB
    assert nvml.initialised == 1
    nvml.gpus[0].used = 7 * GIB
    for _ in range(200):
        if manager.snapshot().gpus[0].memory_used_bytes == 7 * GIB:
            break
        await asyncio.sleep(0.01)
    assert manager.snapshot().gpus[0].memory_used_bytes == 7 * GIB
    await manager.stop()
    assert nvml.initialised == 0
    calls = len(nvml.calls)
    await asyncio.sleep(0.06)
    assert len(nvml.calls) == calls  # polling really stopped
    assert manager.snapshot().gpus[0].memory_used_bytes == 7 * GIB  # last snapshot kept


def test_on_refresh_sees_every_snapshot(make_manager: MakeManager) -> None:
    manager = make_manager(simulated=SIMS[:1])
    seen: list[int] = []
    unsubscribe = manager.on_refresh(lambda s: seen.append(s.gpus[0].memory_used_bytes))
    manager.refresh()
    manager.adjust_simulated(0, GIB)
    unsubscribe()
    manager.refresh()
    assert seen == [0, GIB]


def test_report_is_built_once_per_snapshot(make_manager: MakeManager) -> None:
    manager = make_manager(simulated=SIMS)
    report = manager.report()
    assert manager.report() is report
    assert report["node"] == "testnode"
    assert [(d["index"], d["backend"], d["memory_used_ratio"]) for d in report["devices"]] == [
        (0, "simulated", 0.0),
        (1, "simulated", round(1 / 12, 4)),
    ]
    manager.adjust_simulated(0, 6 * GIB)
    fresh = manager.report()
    assert fresh is not report and fresh["devices"][0]["memory_used_ratio"] == 0.25
