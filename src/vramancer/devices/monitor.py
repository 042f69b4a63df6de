"""VRAM monitor: notice when a GPU's free memory moves.

Each subscriber has a threshold and, per device, the free memory it was last told about (its
baseline). A new snapshot fires the subscriber for every device whose free memory is more than
the threshold away from that baseline, and the baseline moves to the new value, so slow drifts
add up until they cross the threshold. A device seen for the first time only sets a baseline.
This module is pure bookkeeping: the device manager calls :meth:`VramMonitor.observe` and runs
the callbacks it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vramancer.devices.types import GpuSnapshot, SystemSnapshot


@dataclass(frozen=True, slots=True)
class VramChange:
    """One device's free memory moved past a subscriber's threshold."""

    index: int
    uuid: str
    name: str
    backend: str
    simulated: bool
    free_before_bytes: int
    free_after_bytes: int
    used_bytes: int
    total_bytes: int

    @property
    def delta_free_bytes(self) -> int:
        """Positive when memory was freed, negative when it was taken."""
        return self.free_after_bytes - self.free_before_bytes

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["delta_free_bytes"] = self.delta_free_bytes
        return data


VramCallback = Callable[[VramChange], None]


@dataclass(eq=False)
class _Subscriber:
    callback: VramCallback
    threshold_bytes: int
    baseline: dict[str, int] = field(default_factory=dict)


class VramMonitor:
    """Thresholded free-memory change detection for any number of subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(
        self, callback: VramCallback, threshold_bytes: int, current: SystemSnapshot | None
    ) -> Callable[[], None]:
        """Add a subscriber whose baseline is ``current``; returns the unsubscribe function."""
        if threshold_bytes < 0:
            raise ValueError(f"threshold_bytes must be 0 or more (got {threshold_bytes})")
        sub = _Subscriber(callback, int(threshold_bytes))
        if current is not None:
            sub.baseline = {g.uuid: g.memory_free_bytes for g in current.gpus}
        with self._lock:
            self._subscribers.append(sub)

        def unsubscribe() -> None:
            with self._lock:
                if sub in self._subscribers:
                    self._subscribers.remove(sub)

        return unsubscribe

    def observe(self, snapshot: SystemSnapshot) -> list[tuple[VramCallback, VramChange]]:
        """Update baselines from ``snapshot``; return the (callback, change) pairs to run."""
        with self._lock:
            subscribers = list(self._subscribers)
        fired: list[tuple[VramCallback, VramChange]] = []
        present = {g.uuid for g in snapshot.gpus}
        for sub in subscribers:
            for gpu in snapshot.gpus:
                change = _check(sub, gpu)
                if change is not None:
                    fired.append((sub.callback, change))
            for gone in set(sub.baseline) - present:
                del sub.baseline[gone]
        return fired

    def __len__(self) -> int:
        with self._lock:
            return len(self._subscribers)


def _check(sub: _Subscriber, gpu: GpuSnapshot) -> VramChange | None:
    before = sub.baseline.get(gpu.uuid)
    now = gpu.memory_free_bytes
    if before is None:
        sub.baseline[gpu.uuid] = now
        return None
    if abs(now - before) <= sub.threshold_bytes:
        return None
    sub.baseline[gpu.uuid] = now
    return VramChange(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        backend=gpu.vendor.value,
        simulated=gpu.simulated,
        free_before_bytes=before,
        free_after_bytes=now,
        used_bytes=gpu.memory_used_bytes,
        total_bytes=gpu.memory_total_bytes,
    )
