"""Apple Silicon GPUs through ``torch.mps`` (unified memory shared with the CPU).

Detection is a pure function of :class:`AppleFacts` (operating system, machine, CPU brand
string, whether MPS answers) so every case is tested on any machine; :func:`gather_apple_facts`
collects the real facts and only touches torch on macOS.

Memory: ``torch.mps.recommended_max_memory()`` is the GPU's working-set budget (the "total"),
``torch.mps.driver_allocated_memory()`` what Metal has allocated for this process (the "used").
Utilization, temperature and power are not available without root (``None``).
"""

from __future__ import annotations

import logging
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

from vramancer.devices.backend import DeviceQueryError
from vramancer.devices.types import DeviceVendor, GpuSnapshot

log = logging.getLogger(__name__)

_CHIP_RE = re.compile(r"\bM(\d+)\b")


@dataclass(frozen=True, slots=True)
class AppleFacts:
    """What detection needs to know about the machine."""

    system: str
    machine: str
    #: ``sysctl -n machdep.cpu.brand_string``, e.g. ``Apple M2 Pro``; None if unknown.
    cpu_brand: str | None
    mps_available: bool


@dataclass(frozen=True, slots=True)
class AppleChip:
    """An Apple Silicon chip: ``generation`` is ``M1``, ``M2``, ... or None if unrecognised."""

    brand: str
    generation: str | None
    mps_available: bool

    @property
    def slug(self) -> str:
        """``apple-m2-pro``: used in the device UUID."""
        return "-".join(self.brand.lower().split()) or "apple-silicon"


def is_apple_silicon(facts: AppleFacts) -> bool:
    """macOS on an arm64 machine (``platform.processor()`` alone is not enough: it says arm)."""
    return facts.system == "Darwin" and facts.machine.lower() in ("arm64", "aarch64")


def chip_generation(brand: str | None) -> str | None:
    """``M1`` from ``Apple M1 Max``; None when the brand names no M-series chip."""
    if not brand:
        return None
    match = _CHIP_RE.search(brand)
    return f"M{match.group(1)}" if match else None


def detect_apple(facts: AppleFacts) -> AppleChip | None:
    """The Apple Silicon chip described by ``facts``, or None on any other machine."""
    if not is_apple_silicon(facts):
        return None
    brand = facts.cpu_brand or "Apple Silicon"
    return AppleChip(
        brand=brand, generation=chip_generation(brand), mps_available=facts.mps_available
    )


def _sysctl_brand() -> str | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _mps_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def gather_apple_facts() -> AppleFacts:
    """The real machine's facts. Only on macOS does this run ``sysctl`` or import torch."""
    system, machine = platform.system(), platform.machine()
    if system != "Darwin":
        return AppleFacts(system=system, machine=machine, cpu_brand=None, mps_available=False)
    return AppleFacts(
        system=system, machine=machine, cpu_brand=_sysctl_brand(), mps_available=_mps_available()
    )


class MpsMemory(Protocol):
    """The part of ``torch.mps`` read here (a fake in tests)."""

    def recommended_max_memory(self) -> int: ...

    def driver_allocated_memory(self) -> int: ...


class AppleBackend:
    """The one Apple GPU, read through ``torch.mps``."""

    vendor = DeviceVendor.APPLE

    def __init__(self, chip: AppleChip, mps: MpsMemory) -> None:
        self.chip = chip
        self._mps = mps

    @classmethod
    def open(
        cls, facts: AppleFacts | None = None, mps: MpsMemory | None = None
    ) -> AppleBackend | None:
        chip = detect_apple(facts if facts is not None else gather_apple_facts())
        if chip is None or not chip.mps_available:
            return None
        if mps is None:
            import torch

            mps = _TorchMps(torch.mps)
        return cls(chip, mps)

    def device_count(self) -> int:
        return 1

    def read(self, local_index: int) -> GpuSnapshot:
        try:
            total = int(self._mps.recommended_max_memory())
            used = int(self._mps.driver_allocated_memory())
        except (RuntimeError, AttributeError) as exc:
            raise DeviceQueryError(f"torch.mps memory query failed: {exc}") from exc
        return GpuSnapshot(
            index=local_index,
            uuid=f"apple-{self.chip.slug.removeprefix('apple-')}-{local_index}",
            name=self.chip.brand,
            vendor=DeviceVendor.APPLE,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=max(0, total - used),
        )

    def close(self) -> None:
        return None


class _TorchMps:
    """Adapter over ``torch.mps`` (kept tiny so type checkers need no torch stubs)."""

    def __init__(self, module: Any) -> None:
        self._m = module

    def recommended_max_memory(self) -> int:
        return int(self._m.recommended_max_memory())

    def driver_allocated_memory(self) -> int:
        return int(self._m.driver_allocated_memory())
