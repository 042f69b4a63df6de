"""AMD: the sysfs reader against a fake /sys/class/drm tree, and amdsmi against a fake module."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vramancer.devices.amd import (
    AmdSmiBackend,
    SysfsAmdBackend,
    discover_sysfs,
    open_amd,
    read_sysfs_card,
)
from vramancer.devices.backend import DeviceQueryError
from vramancer.devices.types import DeviceVendor

GIB = 1024**3


def make_card(
    root: Path,
    card: int,
    *,
    vendor: str = "0x1002",
    total: int | None = 16 * GIB,
    used: int = 2 * GIB,
    busy: int | None = 42,
    temp_milli: int | None = 55_000,
    power: tuple[str, int] | None = ("power1_average", 180_000_000),
    unique_id: str | None = None,
    slot: str | None = "0000:03:00.0",
    product: str | None = None,
) -> Path:
    """Write the files amdgpu exposes for one card; None leaves a file out."""
    device = root / f"card{card}" / "device"
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    (device / "device").write_text("0x744c\n")
    files: dict[str, Any] = {
        "mem_info_vram_total": total,
        "mem_info_vram_used": used,
        "gpu_busy_percent": busy,
        "unique_id": unique_id,
        "product_name": product,
    }
    for name, value in files.items():
        if value is not None:
            (device / name).write_text(f"{value}\n")
    if slot:
        (device / "uevent").write_text(f"DRIVER=amdgpu\nPCI_SLOT_NAME={slot}\n")
    hwmon = device / "hwmon" / "hwmon4"
    hwmon.mkdir(parents=True)
    if temp_milli is not None:
        (hwmon / "temp1_input").write_text(f"{temp_milli}\n")
    if power is not None:
        (hwmon / power[0]).write_text(f"{power[1]}\n")
    return device


def test_discovery_keeps_amd_cards_with_vram_and_skips_the_rest(tmp_path: Path) -> None:
    make_card(tmp_path, 1, slot="0000:0b:00.0")
    make_card(tmp_path, 0, unique_id="d1a2b3", product="AMD Radeon RX 7900 XTX")
    make_card(tmp_path, 2, vendor="0x10de")  # an NVIDIA card: not ours
    make_card(tmp_path, 3, total=None)  # an AMD APU without VRAM files
    (tmp_path / "card0-DP-1").mkdir()  # a connector
    (tmp_path / "renderD128").mkdir()
    cards = discover_sysfs(tmp_path)
    assert [(c.card, c.uuid, c.name) for c in cards] == [
        (0, "amd-d1a2b3", "AMD Radeon RX 7900 XTX"),
        (1, "amd-0000:0b:00.0", "AMD GPU 0x744c"),
    ]


def test_reading_a_card_converts_units(tmp_path: Path) -> None:
    make_card(tmp_path, 0)
    (card,) = discover_sysfs(tmp_path)
    snap = read_sysfs_card(card, 0)
    assert snap.vendor is DeviceVendor.AMD
    assert snap.memory_total_bytes == 16 * GIB
    assert snap.memory_used_bytes == 2 * GIB
    assert snap.memory_free_bytes == 14 * GIB
    assert snap.utilization_ratio == pytest.approx(0.42)
    assert snap.temperature_celsius == pytest.approx(55.0)
    assert snap.power_watts == pytest.approx(180.0)


def test_power_input_is_used_when_average_is_missing_and_absent_sensors_are_none(
    tmp_path: Path,
) -> None:
    make_card(tmp_path, 0, power=("power1_input", 95_500_000))
    make_card(tmp_path, 1, busy=None, temp_milli=None, power=None)
    backend = SysfsAmdBackend.open(tmp_path)
    assert backend is not None and backend.device_count() == 2
    assert backend.read(0).power_watts == pytest.approx(95.5)
    second = backend.read(1)
    assert (second.utilization_ratio, second.temperature_celsius, second.power_watts) == (
        None,
        None,
        None,
    )


def test_readings_follow_the_files(tmp_path: Path) -> None:
    device = make_card(tmp_path, 0)
    backend = SysfsAmdBackend.open(tmp_path)
    assert backend is not None
    (device / "mem_info_vram_used").write_text(f"{5 * GIB}\n")
    assert backend.read(0).memory_free_bytes == 11 * GIB


def test_a_removed_card_or_garbage_raises_a_typed_error(tmp_path: Path) -> None:
    device = make_card(tmp_path, 0)
    backend = SysfsAmdBackend.open(tmp_path)
    assert backend is not None
    (device / "gpu_busy_percent").write_text("busy\n")
    with pytest.raises(DeviceQueryError, match="gpu_busy_percent"):
        backend.read(0)
    (device / "gpu_busy_percent").unlink()
    (device / "mem_info_vram_used").unlink()
    with pytest.raises(DeviceQueryError, match="no longer reports VRAM"):
        backend.read(0)


def test_no_drm_directory_means_no_amd_backend(tmp_path: Path) -> None:
    assert SysfsAmdBackend.open(tmp_path / "missing") is None
    assert open_amd(tmp_path / "missing", smi=FakeAmdSmi(fail_init=True)) is None
    assert open_amd(tmp_path, smi=FakeAmdSmi(handles=0)) is None


class AmdSmiException(Exception):
    pass


class FakeAmdSmi:
    """The handful of amdsmi calls the backend makes (amdsmi reports MB and "N/A")."""

    AmdSmiException = AmdSmiException
    AmdSmiTemperatureType = SimpleNamespace(EDGE="edge")
    AmdSmiTemperatureMetric = SimpleNamespace(CURRENT="current")

    def __init__(self, handles: int = 1, fail_init: bool = False) -> None:
        self.handles = [f"h{i}" for i in range(handles)]
        self.fail_init = fail_init
        self.shut = 0

    def amdsmi_init(self) -> None:
        if self.fail_init:
            raise AmdSmiException("no ROCm driver")

    def amdsmi_shut_down(self) -> None:
        self.shut += 1

    def amdsmi_get_processor_handles(self) -> list[str]:
        return self.handles

    def amdsmi_get_gpu_device_uuid(self, h: str) -> str:
        return f"uuid-{h}"

    def amdsmi_get_gpu_asic_info(self, h: str) -> dict[str, Any]:
        return {"market_name": "AMD Instinct MI210"}

    def amdsmi_get_gpu_vram_usage(self, h: str) -> dict[str, int]:
        return {"vram_total": 65520, "vram_used": 1024}

    def amdsmi_get_gpu_activity(self, h: str) -> dict[str, Any]:
        return {"gfx_activity": 12, "umc_activity": "N/A"}

    def amdsmi_get_temp_metric(self, h: str, kind: str, metric: str) -> int:
        assert (kind, metric) == ("edge", "current")
        raise AmdSmiException("not supported")

    def amdsmi_get_power_info(self, h: str) -> dict[str, Any]:
        return {"average_socket_power": "N/A", "current_socket_power": 88}


def test_amdsmi_backend_reads_memory_and_maps_unavailable_values_to_none() -> None:
    smi = FakeAmdSmi()
    backend = AmdSmiBackend.open(smi)
    assert backend is not None
    snap = backend.read(0)
    assert (snap.uuid, snap.name) == ("amd-uuid-h0", "AMD Instinct MI210")
    assert snap.memory_total_bytes == 65520 * 1024**2
    assert snap.memory_used_bytes == 1024 * 1024**2
    assert snap.utilization_ratio == pytest.approx(0.12)
    assert snap.temperature_celsius is None
    assert snap.power_watts == pytest.approx(88.0)  # average is "N/A": the current reading
    backend.close()
    backend.close()
    assert smi.shut == 1


def test_amdsmi_failing_falls_back_to_sysfs(tmp_path: Path) -> None:
    make_card(tmp_path, 0)
    backend = open_amd(tmp_path, smi=FakeAmdSmi(fail_init=True))
    assert isinstance(backend, SysfsAmdBackend)


def test_amdsmi_listing_failure_shuts_amdsmi_down_and_falls_back(tmp_path: Path) -> None:
    class ListingFails(FakeAmdSmi):
        def amdsmi_get_gpu_device_uuid(self, h: str) -> str:
            raise AmdSmiException("device busy")

    smi = ListingFails()
    make_card(tmp_path, 0)
    assert isinstance(open_amd(tmp_path, smi=smi), SysfsAmdBackend)
    assert smi.shut == 1  # initialised, so shut down again
    failed_init = FakeAmdSmi(fail_init=True)
    assert AmdSmiBackend.open(failed_init) is None and failed_init.shut == 0
