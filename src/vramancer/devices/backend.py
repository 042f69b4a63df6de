"""What every vendor binding provides, and the typed errors they raise.

A backend is opened once (discovery), then read once per poll. ``read(local_index)`` returns a
:class:`~vramancer.devices.types.GpuSnapshot` whose ``index`` is the backend's own order; the
:class:`~vramancer.devices.manager.DeviceManager` renumbers devices (real GPUs first, then
simulated ones) and stamps the time. A value the hardware does not report is ``None``; a failed
read raises :class:`DeviceQueryError`, and the manager keeps the last good reading with
``error`` set.
"""

from __future__ import annotations

from typing import Protocol

from vramancer.devices.types import DeviceVendor, GpuSnapshot
from vramancer.errors import VramancerError


class DeviceQueryError(VramancerError):
    """A driver call failed (the device may be lost, the driver may have been reloaded)."""

    code = "device_query_failed"
    http_status = 503


class GpuBackend(Protocol):
    """One vendor's devices on this host, opened and ready to read."""

    #: Which vendor these devices are (also the ``backend`` metric label).
    vendor: DeviceVendor

    def device_count(self) -> int:
        """How many devices were discovered when the backend was opened."""
        ...

    def read(self, local_index: int) -> GpuSnapshot:
        """Read one device now (blocking driver calls). Raises ``DeviceQueryError``."""
        ...

    def close(self) -> None:
        """Release the driver (NVML shutdown, ...). Safe to call twice."""
        ...
