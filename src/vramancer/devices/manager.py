"""``DeviceManager``: discovers GPUs once, polls them, and keeps the latest snapshot.

Readers (the API, policies, other subsystems) call :meth:`DeviceManager.snapshot`, which returns
the cached :class:`~vramancer.devices.types.SystemSnapshot` and never calls a driver (the very
first call, before any poll, polls once). ``start()`` polls once, then an asyncio task polls
every ``poll_interval_s``, with the blocking driver calls in a worker thread
(``asyncio.to_thread``); the snapshot is stored, exported as metrics and compared with the last
one (VRAM monitor, ``vram_changed`` / ``device_changed`` events) back on the caller's thread.

Index assignment: real GPUs first (NVIDIA, then AMD, then Apple, each in its driver's order,
0..n-1), then the simulated devices in config order. Indices are fixed at discovery.
No real GPU is normal: the host alone (plus any simulated devices), "CPU-only mode" logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from vramancer import event_types as ev
from vramancer.clock import Clock
from vramancer.devices.amd import open_amd
from vramancer.devices.apple import AppleBackend
from vramancer.devices.backend import DeviceQueryError, GpuBackend
from vramancer.devices.host import HostReader
from vramancer.devices.monitor import VramCallback, VramChange, VramMonitor
from vramancer.devices.nvidia import NvidiaBackend
from vramancer.devices.report import devices_report
from vramancer.devices.settings import DevicesSettings
from vramancer.devices.simulated import SimulatedBackend
from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
from vramancer.errors import NotFound
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

BackendOpener = Callable[[], GpuBackend | None]
SnapshotCallback = Callable[[SystemSnapshot], None]

#: How each real vendor is opened (replaced in tests through ``openers=``).
DEFAULT_OPENERS: Mapping[str, BackendOpener] = {
    "nvidia": NvidiaBackend.open,
    "amd": open_amd,
    "apple": AppleBackend.open,
}
#: Buckets of the poll-duration histogram (seconds): a poll should take milliseconds.
POLL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class VramInfo:
    """One GPU's memory for ``/v1/gpu/status``' ``vram``: MiB and percent, the units that
    answer has always used."""

    total_mb: int
    used_mb: int
    free_mb: int
    gpu_name: str
    gpu_utilization_percent: int


class _Gauges:
    """The per-device and host gauges, created once per manager."""

    def __init__(self, metrics: Metrics) -> None:
        labels = ("backend", "device", "node")
        g = metrics.gauge
        self.total = g("gpu_memory_total_bytes", "GPU memory size.", labels)
        self.used = g("gpu_memory_used_bytes", "GPU memory in use.", labels)
        self.free = g("gpu_memory_free_bytes", "GPU memory free.", labels)
        self.util = g("gpu_utilization_ratio", "GPU busy fraction (0-1).", labels)
        self.temp = g("gpu_temperature_celsius", "GPU temperature.", labels)
        self.power = g("gpu_power_watts", "GPU power draw.", labels)
        self.up = g("gpu_up", "1 when the last poll of the GPU succeeded, else 0.", labels)
        self.host_total = g("host_memory_total_bytes", "Host RAM size.", labels)
        self.host_available = g(
            "host_memory_available_bytes", "Host RAM available (MemAvailable).", labels
        )
        self.host_used = g("host_memory_used_bytes", "Host RAM in use (total - available).", labels)
        self.host_swap_total = g("host_swap_total_bytes", "Swap size.", labels)
        self.host_swap_used = g("host_swap_used_bytes", "Swap in use.", labels)
        self.host_cpu = g("host_cpu_utilization_ratio", "Host CPU busy fraction (0-1).", labels)
        self.duration = metrics.histogram(
            "device_poll_duration_seconds",
            "Time one device poll took (all drivers and the host).",
            ("node",),
            buckets=POLL_BUCKETS,
        )
        self.errors = metrics.counter(
            "device_poll_errors_total", "Failed reads of one device.", labels
        )


class DeviceManager:
    """Device discovery, polling and the cached snapshot. Thread-safe."""

    def __init__(
        self,
        settings: DevicesSettings,
        *,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
        openers: Mapping[str, BackendOpener] | None = None,
        host_reader: HostReader | None = None,
    ) -> None:
        self.settings = settings
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.node = metrics.node
        self._openers = dict(openers if openers is not None else DEFAULT_OPENERS)
        self._host_reader = host_reader
        self._sim = SimulatedBackend(list(settings.simulated))
        self._real: list[GpuBackend] | None = None
        self._real_readings: tuple[GpuSnapshot, ...] = ()
        self._host: HostSnapshot | None = None
        self._snapshot: SystemSnapshot | None = None
        self._read_lock = threading.Lock()
        self._apply_lock = threading.RLock()
        self._monitor = VramMonitor()
        self._refresh_callbacks: list[SnapshotCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._report: tuple[SystemSnapshot, dict[str, Any]] | None = None
        self._cpu_only_logged = False
        self._gauges = _Gauges(metrics)
        self._monitor.subscribe(self._publish_vram_change, settings.vram_change_threshold, None)

    # -- readers -------------------------------------------------------------------------

    def snapshot(self) -> SystemSnapshot:
        """The latest snapshot; never calls a driver (except the very first time, once)."""
        snap = self._snapshot
        return snap if snap is not None else self.refresh()

    def report(self) -> dict[str, Any]:
        """The ``GET /v1/devices`` body for the latest snapshot, built once per snapshot.

        Callers must not mutate it."""
        snap = self.snapshot()
        cached = self._report
        if cached is not None and cached[0] is snap:
            return cached[1]
        body = devices_report(snap, self.node)
        self._report = (snap, body)
        return body

    @property
    def real_gpu_count(self) -> int:
        """Real (non-simulated) GPUs found at discovery; 0 before the first poll."""
        return len(self._real_readings)

    def get_vram_info(self, index: int | None = None) -> VramInfo:
        """The memory of GPU ``index`` (default: the first) from the latest snapshot; zeros when
        there is no GPU."""
        snap = self.snapshot()
        gpu = snap.gpus[0] if index is None and snap.gpus else snap.gpu(index or 0)
        if gpu is None:
            if index is not None:
                raise NotFound(f"no device with index {index}")
            return VramInfo(0, 0, 0, "none (CPU-only)", 0)
        util = gpu.utilization_ratio
        return VramInfo(
            total_mb=gpu.memory_total_bytes // _MIB,
            used_mb=gpu.memory_used_bytes // _MIB,
            free_mb=gpu.memory_free_bytes // _MIB,
            gpu_name=gpu.name,
            gpu_utilization_percent=0 if util is None else round(util * 100),
        )

    def get_available_vram_mb(self, index: int | None = None) -> int:
        """Free memory of GPU ``index`` (default: the first) in MiB."""
        return self.get_vram_info(index).free_mb

    # -- subscriptions -------------------------------------------------------------------

    def on_vram_changed(
        self, callback: VramCallback, threshold_bytes: int | None = None
    ) -> Callable[[], None]:
        """Call ``callback(VramChange)`` when a GPU's free memory moves by more than
        ``threshold_bytes`` (default ``devices.vram_change_threshold``). Returns unsubscribe.

        Callbacks run on the thread that applied the snapshot (the event loop for the poller);
        they must be quick and must not block.
        """
        threshold = threshold_bytes
        if threshold is None:
            threshold = self.settings.vram_change_threshold
        return self._monitor.subscribe(callback, threshold, self._snapshot)

    def on_refresh(self, callback: SnapshotCallback) -> Callable[[], None]:
        """Call ``callback(snapshot)`` after every poll. Returns the unsubscribe function."""
        with self._apply_lock:
            self._refresh_callbacks.append(callback)

        def unsubscribe() -> None:
            with self._apply_lock:
                if callback in self._refresh_callbacks:
                    self._refresh_callbacks.remove(callback)

        return unsubscribe

    # -- polling -------------------------------------------------------------------------

    def refresh(self) -> SystemSnapshot:
        """Poll every device once, now, on this thread (blocking driver calls)."""
        real, host, duration = self._read()
        return self._apply(real, host, duration)

    async def refresh_async(self) -> SystemSnapshot:
        """Poll once with the driver calls in a worker thread; apply on the caller's loop."""
        real, host, duration = await asyncio.to_thread(self._read)
        return self._apply(real, host, duration)

    async def start(self) -> None:
        """Discover and poll once, then keep polling every ``poll_interval_s``."""
        if self._task is not None:
            return
        await self.refresh_async()
        self._task = asyncio.create_task(self._poll_forever(), name="vramancer-device-poller")

    async def stop(self) -> None:
        """Stop polling and release the drivers. The last snapshot stays readable."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.close()

    def close(self) -> None:
        """Release the drivers (no poller must be running: use ``stop()`` after ``start()``).
        A later poll discovers the devices again."""
        with self._read_lock:
            backends, self._real = self._real, None
            for backend in backends or ():
                try:
                    backend.close()
                except Exception:
                    log.exception("closing the %s backend failed", backend.vendor.value)

    async def _poll_forever(self) -> None:
        interval = self.settings.poll_interval_s
        delay = interval
        while True:
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                await self.refresh_async()
            except Exception:  # a broken backend must not stop telemetry for the others
                log.exception("device poll failed")
            delay = max(0.0, interval - (time.monotonic() - started))

    # -- simulated devices ---------------------------------------------------------------

    def adjust_simulated(self, index: int, delta_used_bytes: int) -> None:
        """Move simulated device ``index``'s used memory by ``delta_used_bytes`` (clamped to
        [0, total]); the snapshot, metrics and VRAM monitor see it immediately."""
        local = self._simulated_local(index)
        self._sim.adjust(local, delta_used_bytes)
        self._apply(None, None, None)

    def set_simulated(
        self,
        index: int,
        *,
        used_bytes: int | None = None,
        utilization_ratio: float | None = None,
        temperature_celsius: float | None = None,
    ) -> None:
        """Set a simulated device's readings (tests, demos); applied immediately."""
        local = self._simulated_local(index)
        self._sim.set(
            local,
            used_bytes=used_bytes,
            utilization_ratio=utilization_ratio,
            temperature_celsius=temperature_celsius,
        )
        self._apply(None, None, None)

    def _simulated_local(self, index: int) -> int:
        self.snapshot()  # discovery fixes how many real GPUs come first
        local = index - len(self._real_readings)
        if not 0 <= local < self._sim.device_count():
            raise NotFound(f"device {index} is not a simulated device")
        return local

    # -- internals -----------------------------------------------------------------------

    def _discover(self) -> list[GpuBackend]:
        backends: list[GpuBackend] = []
        for name in self.settings.backends:
            opener = self._openers.get(name)
            if opener is None:
                continue
            try:
                backend = opener()
            except Exception:
                log.exception("probing %s GPUs failed; continuing without them", name)
                continue
            if backend is not None and backend.device_count() > 0:
                backends.append(backend)
        found = sum(b.device_count() for b in backends)
        if found:
            log.info("found %d GPU(s): %s", found, ", ".join(b.vendor.value for b in backends))
        elif not self._cpu_only_logged:
            self._cpu_only_logged = True
            sims = self._sim.device_count()
            extra = f" ({sims} simulated device(s) declared in config)" if sims else ""
            log.info("no GPU found: CPU-only mode%s", extra)
        return backends

    def _read(self) -> tuple[tuple[GpuSnapshot, ...], HostSnapshot, float]:
        """The blocking part of a poll: every real GPU and the host."""
        with self._read_lock:
            started = time.perf_counter()
            if self._real is None:
                self._real = self._discover()
            if self._host_reader is None:
                self._host_reader = HostReader()
            now = self.clock.monotonic()
            previous = {g.index: g for g in self._real_readings}
            readings: list[GpuSnapshot] = []
            for backend in self._real:
                for local in range(backend.device_count()):
                    index = len(readings)
                    readings.append(self._read_one(backend, local, index, now, previous))
            host = self._host_reader.read(now)
            return tuple(readings), host, time.perf_counter() - started

    def _read_one(
        self,
        backend: GpuBackend,
        local: int,
        index: int,
        now: float,
        previous: dict[int, GpuSnapshot],
    ) -> GpuSnapshot:
        try:
            return replace(backend.read(local), index=index, taken_at=now)
        except Exception as exc:  # one broken device must not stop telemetry for the others
            typed = isinstance(exc, DeviceQueryError)
            message = (
                exc.message if isinstance(exc, DeviceQueryError) else f"{type(exc).__name__}: {exc}"
            )
            last = previous.get(index)
            if last is None or last.error != message:  # logged once, not every poll
                vendor = backend.vendor.value
                # An untyped error is a binding bug or an unexpected answer: keep the traceback.
                log.warning(
                    "reading %s GPU %d failed: %s", vendor, index, message, exc_info=not typed
                )
            if last is None:
                last = GpuSnapshot(
                    index=index,
                    uuid=f"{backend.vendor.value}-{local}",
                    name=f"{backend.vendor.value} GPU {local}",
                    vendor=backend.vendor,
                    memory_total_bytes=0,
                    memory_used_bytes=0,
                    memory_free_bytes=0,
                )
            self._gauges.errors.labels(backend.vendor.value, last.uuid, self.node).inc()
            return replace(last, error=message)

    def _simulated_readings(self, first_index: int, now: float) -> list[GpuSnapshot]:
        return [
            replace(self._sim.read(i), index=first_index + i, taken_at=now)
            for i in range(self._sim.device_count())
        ]

    def _apply(
        self,
        real: tuple[GpuSnapshot, ...] | None,
        host: HostSnapshot | None,
        duration: float | None,
    ) -> SystemSnapshot:
        """Store a new snapshot (new real/host readings, current simulated ones) and notify."""
        with self._apply_lock:
            if real is not None:
                self._real_readings = real
            if host is not None:
                self._host = host
            assert self._host is not None, "apply before the first read"
            now = self.clock.monotonic()
            gpus = (*self._real_readings, *self._simulated_readings(len(self._real_readings), now))
            taken_at = self._host.taken_at if host is not None else now
            snap = SystemSnapshot(host=self._host, gpus=gpus, taken_at=taken_at)
            previous, self._snapshot = self._snapshot, snap
            if duration is not None:
                self._gauges.duration.labels(self.node).observe(duration)
            self._export(snap)
            self._notify(snap, previous)
            return snap

    def _export(self, snap: SystemSnapshot) -> None:
        g, node = self._gauges, self.node
        for gpu in snap.gpus:
            labels = (gpu.vendor.value, gpu.uuid, node)
            g.total.labels(*labels).set(gpu.memory_total_bytes)
            g.used.labels(*labels).set(gpu.memory_used_bytes)
            g.free.labels(*labels).set(gpu.memory_free_bytes)
            g.up.labels(*labels).set(0 if gpu.error else 1)
            for gauge, value in (
                (g.util, gpu.utilization_ratio),
                (g.temp, gpu.temperature_celsius),
                (g.power, gpu.power_watts),
            ):
                if value is not None:
                    gauge.labels(*labels).set(value)
        h = snap.host
        host_labels = ("host", "host", node)
        g.host_total.labels(*host_labels).set(h.memory_total_bytes)
        g.host_available.labels(*host_labels).set(h.memory_available_bytes)
        g.host_used.labels(*host_labels).set(h.memory_used_bytes)
        g.host_swap_total.labels(*host_labels).set(h.swap_total_bytes)
        g.host_swap_used.labels(*host_labels).set(h.swap_used_bytes)
        g.host_cpu.labels(*host_labels).set(h.cpu_utilization_ratio)

    def _notify(self, snap: SystemSnapshot, previous: SystemSnapshot | None) -> None:
        self._publish_device_changes(snap, previous)
        for callback, change in self._monitor.observe(snap):
            try:
                callback(change)
            except Exception:
                log.exception("VRAM monitor callback failed")
        for refresh_cb in list(self._refresh_callbacks):
            try:
                refresh_cb(snap)
            except Exception:
                log.exception("device refresh callback failed")

    def _publish_device_changes(
        self, snap: SystemSnapshot, previous: SystemSnapshot | None
    ) -> None:
        before = {g.uuid: g for g in previous.gpus} if previous is not None else {}
        after = {g.uuid: g for g in snap.gpus}
        for uuid, gpu in after.items():
            old = before.get(uuid)
            if old is None:
                change = "added"
            elif bool(old.error) != bool(gpu.error):
                change = "error" if gpu.error else "recovered"
            else:
                continue
            self.events.publish(_device_event(gpu, change))
        for uuid in before.keys() - after.keys():
            self.events.publish(_device_event(before[uuid], "removed"))

    def _publish_vram_change(self, change: VramChange) -> None:
        self.events.publish(
            ev.VramChanged(
                index=change.index,
                uuid=change.uuid,
                name=change.name,
                backend=change.backend,
                simulated=change.simulated,
                free_before_bytes=change.free_before_bytes,
                free_after_bytes=change.free_after_bytes,
                used_bytes=change.used_bytes,
                total_bytes=change.total_bytes,
                delta_free_bytes=change.delta_free_bytes,
            )
        )


def _device_event(gpu: GpuSnapshot, change: str) -> ev.DeviceChanged:
    return ev.DeviceChanged(
        change=change,
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        backend=gpu.vendor.value,
        simulated=gpu.vendor is DeviceVendor.SIMULATED,
        error=gpu.error,
    )
