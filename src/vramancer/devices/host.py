"""The host's CPU and memory through psutil (every OS psutil supports).

``memory_available_bytes`` is what the kernel says can be given to new work without swapping
(Linux ``MemAvailable``), which is the number memory decisions should use, not "free".
"""

from __future__ import annotations

import os
import platform
import socket
import time

import psutil

from vramancer.devices.types import HostSnapshot

#: Shortest window CPU utilization is measured over (the first read waits this long).
MIN_CPU_WINDOW_S = 0.1


class HostReader:
    """Reads :class:`HostSnapshot`; CPU utilization is measured between two reads."""

    def __init__(self) -> None:
        self._hostname = socket.gethostname()
        self._platform = platform.system()
        self._machine = platform.machine()
        self._cpu_count = os.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # start the CPU measurement window
        self._window_start = time.monotonic()

    def _cpu_ratio(self) -> float:
        # A window shorter than MIN_CPU_WINDOW_S reads as 0 % or 100 %: wait for a real one.
        short = MIN_CPU_WINDOW_S - (time.monotonic() - self._window_start)
        busy = psutil.cpu_percent(interval=short if short > 0 else None)
        self._window_start = time.monotonic()
        return float(busy) / 100.0

    def read(self, taken_at: float) -> HostSnapshot:
        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        return HostSnapshot(
            cpu_count=self._cpu_count,
            cpu_utilization_ratio=self._cpu_ratio(),
            memory_total_bytes=int(vm.total),
            memory_available_bytes=int(vm.available),
            memory_used_bytes=int(vm.total - vm.available),
            swap_total_bytes=int(swap.total),
            swap_used_bytes=int(swap.used),
            taken_at=taken_at,
            hostname=self._hostname,
            platform=self._platform,
            machine=self._machine,
        )
