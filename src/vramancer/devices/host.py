"""The host's CPU and memory through psutil (every OS psutil supports).

``memory_available_bytes`` is what the kernel says can be given to new work without swapping
(Linux ``MemAvailable``), which is the number memory decisions should use, not "free".
"""

from __future__ import annotations

import os
import platform
import socket

import psutil

from vramancer.devices.types import HostSnapshot


class HostReader:
    """Reads :class:`HostSnapshot`; CPU utilization is measured between two reads."""

    def __init__(self) -> None:
        self._hostname = socket.gethostname()
        self._platform = platform.system()
        self._machine = platform.machine()
        self._cpu_count = os.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # start the CPU measurement window

    def read(self, taken_at: float) -> HostSnapshot:
        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        return HostSnapshot(
            cpu_count=self._cpu_count,
            cpu_utilization_ratio=psutil.cpu_percent(interval=None) / 100.0,
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
