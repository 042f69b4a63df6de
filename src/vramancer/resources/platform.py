"""Platform facts: what the quantization advisor needs to know about this machine.

:class:`PlatformFacts` is a frozen record so the advisor is a pure function and every branch of
its rules is unit-tested on any machine. :func:`gather_platform_facts` builds it from a device
snapshot (never a driver call) plus cheap, cached import probes (MLX, Core ML).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

from vramancer.devices.apple import AppleFacts, detect_apple, gather_apple_facts
from vramancer.devices.types import DeviceVendor, SystemSnapshot


@dataclass(frozen=True, slots=True)
class PlatformFacts:
    """The machine as the advisor sees it."""

    is_apple_silicon: bool = False
    #: ``M1``, ``M2``, ``M3``, ``M4``... on Apple Silicon, when the chip is recognised.
    chip: str | None = None
    has_mps: bool = False
    mlx_available: bool = False
    coreml_available: bool = False
    #: A CUDA-class GPU (NVIDIA, or AMD through ROCm) is present.
    cuda_available: bool = False
    #: The GPU the advice is for: the one with the most free memory (0 when none).
    gpu_free_bytes: int = 0
    gpu_total_bytes: int = 0
    gpu_vendor: str | None = None
    #: That GPU is a simulated one (demo/test configuration).
    gpu_simulated: bool = False
    host_available_bytes: int = 0
    host_total_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _apple_facts() -> AppleFacts:
    return gather_apple_facts()


def gather_platform_facts(
    snapshot: SystemSnapshot, apple: AppleFacts | None = None
) -> PlatformFacts:
    """Facts from the cached snapshot; ``apple`` overrides the (cached) real Apple facts."""
    chip = detect_apple(apple if apple is not None else _apple_facts())
    gpus = [g for g in snapshot.gpus if g.error is None]
    cuda = [g for g in gpus if g.vendor in (DeviceVendor.NVIDIA, DeviceVendor.AMD)]
    candidates = cuda or gpus
    best = max(candidates, key=lambda g: g.memory_free_bytes, default=None)
    host = snapshot.host
    return PlatformFacts(
        is_apple_silicon=chip is not None,
        chip=chip.generation if chip else None,
        has_mps=bool(chip and chip.mps_available),
        mlx_available=chip is not None and _module_available("mlx"),
        coreml_available=chip is not None and _module_available("coremltools"),
        cuda_available=bool(cuda),
        gpu_free_bytes=best.memory_free_bytes if best else 0,
        gpu_total_bytes=best.memory_total_bytes if best else 0,
        gpu_vendor=best.vendor.value if best else None,
        gpu_simulated=bool(best and best.simulated),
        host_available_bytes=host.memory_available_bytes,
        host_total_bytes=host.memory_total_bytes,
    )
