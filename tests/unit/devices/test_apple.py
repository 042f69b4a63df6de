"""Apple Silicon detection from injected facts, and the MPS backend with a fake torch.mps."""

from __future__ import annotations

import platform

import pytest

from vramancer.devices.apple import (
    AppleBackend,
    AppleFacts,
    chip_generation,
    detect_apple,
    gather_apple_facts,
    is_apple_silicon,
)
from vramancer.devices.backend import DeviceQueryError
from vramancer.devices.types import DeviceVendor

GIB = 1024**3


def facts(
    system: str = "Darwin", machine: str = "arm64", brand: str | None = "Apple M2 Pro", mps=True
) -> AppleFacts:
    return AppleFacts(system=system, machine=machine, cpu_brand=brand, mps_available=mps)


@pytest.mark.parametrize(
    ("brand", "generation"),
    [
        ("Apple M1", "M1"),
        ("Apple M1 Max", "M1"),
        ("Apple M2 Pro", "M2"),
        ("Apple M3", "M3"),
        ("Apple M4 Max", "M4"),
        ("Apple M10 Ultra", "M10"),
        ("Intel(R) Core(TM) i9-9980HK", None),
        ("", None),
        (None, None),
    ],
)
def test_chip_generation_from_brand_string(brand: str | None, generation: str | None) -> None:
    assert chip_generation(brand) == generation


def test_only_macos_on_arm64_is_apple_silicon() -> None:
    assert is_apple_silicon(facts())
    assert is_apple_silicon(facts(machine="aarch64"))
    assert not is_apple_silicon(facts(machine="x86_64"))  # an Intel Mac
    assert not is_apple_silicon(facts(system="Linux", machine="aarch64"))  # e.g. a Jetson


def test_detect_apple_names_the_chip_or_returns_none() -> None:
    chip = detect_apple(facts(brand="Apple M3 Max"))
    assert chip is not None
    assert (chip.brand, chip.generation, chip.mps_available) == ("Apple M3 Max", "M3", True)
    unknown = detect_apple(facts(brand=None, mps=False))
    assert unknown is not None and unknown.generation is None and not unknown.mps_available
    assert detect_apple(facts(system="Linux")) is None


class FakeMps:
    def __init__(self, total: int, used: int, fail: bool = False) -> None:
        self.total, self.used, self.fail = total, used, fail

    def recommended_max_memory(self) -> int:
        if self.fail:
            raise RuntimeError("MPS backend out of order")
        return self.total

    def driver_allocated_memory(self) -> int:
        return self.used


def test_mps_backend_reads_unified_memory_budget() -> None:
    backend = AppleBackend.open(facts(brand="Apple M2 Pro"), mps=FakeMps(21 * GIB, 5 * GIB))
    assert backend is not None and backend.device_count() == 1
    snap = backend.read(0)
    assert snap.vendor is DeviceVendor.APPLE
    assert (snap.uuid, snap.name) == ("apple-m2-pro-0", "Apple M2 Pro")
    assert (snap.memory_total_bytes, snap.memory_used_bytes, snap.memory_free_bytes) == (
        21 * GIB,
        5 * GIB,
        16 * GIB,
    )
    assert snap.utilization_ratio is None and snap.temperature_celsius is None
    assert snap.torch_device == "mps"


def test_no_backend_without_mps_or_off_macos() -> None:
    assert AppleBackend.open(facts(mps=False), mps=FakeMps(1, 0)) is None
    assert AppleBackend.open(facts(system="Linux"), mps=FakeMps(1, 0)) is None


def test_a_failing_mps_query_is_a_typed_error() -> None:
    backend = AppleBackend.open(facts(), mps=FakeMps(1, 0, fail=True))
    assert backend is not None
    with pytest.raises(DeviceQueryError, match=r"torch\.mps"):
        backend.read(0)


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the non-macOS path")
def test_gathering_facts_off_macos_touches_nothing() -> None:
    got = gather_apple_facts()
    assert got.system == platform.system()
    assert got.cpu_brand is None and got.mps_available is False
