"""Simulated GPUs declared in config (``[[devices.simulated]]``) for demos and tests.

They hold no real memory: their "used" bytes are a counter that other subsystems move
(``DeviceManager.adjust_simulated``, e.g. when a model is "loaded" on one) and that tests set
(``set_simulated``). Vendor ``simulated``, UUID ``sim-<name>``: they say what they are in every
output and metric label.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vramancer.devices.settings import SimulatedDevice
from vramancer.devices.types import DeviceVendor, GpuSnapshot
from vramancer.errors import InvalidInput
from vramancer.units import format_size


@dataclass(slots=True)
class _SimState:
    name: str
    total: int
    used: int
    utilization: float
    temperature: float


class SimulatedBackend:
    """The simulated devices, in config order. Thread-safe."""

    vendor = DeviceVendor.SIMULATED

    def __init__(self, specs: list[SimulatedDevice]) -> None:
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInput(
                f"devices.simulated: names must be unique (repeated: {', '.join(duplicates)})"
            )
        for spec in specs:
            if spec.used > spec.memory:
                raise InvalidInput(
                    f"devices.simulated.{spec.name}.used: {format_size(spec.used)} is more than "
                    f"its memory ({format_size(spec.memory)})"
                )
        self._states = [
            _SimState(s.name, int(s.memory), int(s.used), s.utilization, s.temperature_celsius)
            for s in specs
        ]
        self._lock = threading.Lock()

    def device_count(self) -> int:
        return len(self._states)

    def read(self, local_index: int) -> GpuSnapshot:
        with self._lock:
            st = self._states[local_index]
            return GpuSnapshot(
                index=local_index,
                uuid=f"sim-{st.name}",
                name=f"Simulated GPU {st.name}",
                vendor=DeviceVendor.SIMULATED,
                memory_total_bytes=st.total,
                memory_used_bytes=st.used,
                memory_free_bytes=st.total - st.used,
                utilization_ratio=st.utilization,
                temperature_celsius=st.temperature,
                power_watts=None,
            )

    def adjust(self, local_index: int, delta_used_bytes: int) -> int:
        """Move the used counter by ``delta_used_bytes``, clamped to [0, total]; returns it."""
        with self._lock:
            st = self._states[local_index]
            st.used = min(st.total, max(0, st.used + int(delta_used_bytes)))
            return st.used

    def set(
        self,
        local_index: int,
        *,
        used_bytes: int | None = None,
        utilization_ratio: float | None = None,
        temperature_celsius: float | None = None,
    ) -> None:
        """Set readings directly (tests, demos). Out-of-range values are refused."""
        with self._lock:
            st = self._states[local_index]
            if used_bytes is not None:
                if not 0 <= used_bytes <= st.total:
                    raise InvalidInput(
                        f"used_bytes must be between 0 and {st.total} for {st.name} "
                        f"(got {used_bytes})"
                    )
                st.used = int(used_bytes)
            if utilization_ratio is not None:
                if not 0.0 <= utilization_ratio <= 1.0:
                    raise InvalidInput(
                        f"utilization_ratio must be between 0 and 1 (got {utilization_ratio})"
                    )
                st.utilization = float(utilization_ratio)
            if temperature_celsius is not None:
                st.temperature = float(temperature_celsius)

    def close(self) -> None:
        return None
