"""Simulated devices from config, and the host reader against psutil."""

from __future__ import annotations

import psutil
import pytest

from vramancer.config import Settings
from vramancer.devices.host import HostReader
from vramancer.devices.settings import DevicesSettings, SimulatedDevice
from vramancer.devices.simulated import SimulatedBackend
from vramancer.errors import ConfigError, InvalidInput

GIB = 1024**3


def test_simulated_devices_say_what_they_are() -> None:
    backend = SimulatedBackend([SimulatedDevice(name="sim0", memory="24GiB", used="2GiB")])
    snap = backend.read(0)
    assert snap.uuid == "sim-sim0"
    assert snap.simulated and snap.vendor.value == "simulated"
    assert "Simulated" in snap.name
    assert snap.torch_device == "cpu"
    assert snap.as_dict()["simulated"] is True
    assert (snap.memory_total_bytes, snap.memory_free_bytes) == (24 * GIB, 22 * GIB)


def test_adjust_clamps_and_set_validates() -> None:
    backend = SimulatedBackend([SimulatedDevice(name="a", memory=1000)])
    assert backend.adjust(0, 600) == 600
    assert backend.adjust(0, 600) == 1000
    assert backend.adjust(0, -5000) == 0
    with pytest.raises(InvalidInput):
        backend.set(0, used_bytes=-1)


def test_config_refuses_duplicate_names_and_used_over_memory() -> None:
    with pytest.raises(ConfigError, match=r"devices: .*unique"):
        Settings.load(
            devices={"simulated": [{"name": "x", "memory": "1GiB"}, {"name": "x", "memory": 1}]}
        )
    with pytest.raises(ConfigError, match=r"devices\.simulated\.0: .*used"):
        Settings.load(devices={"simulated": [{"name": "x", "memory": "1GiB", "used": "2GiB"}]})
    with pytest.raises(ConfigError, match=r"devices\.simulated\.0\.memory: expected an integer"):
        Settings.load(devices={"simulated": [{"name": "x", "memory": "lots"}]})
    with pytest.raises(ConfigError, match=r"devices\.backends\.0"):
        Settings.load(devices={"backends": ["intel"]})
    assert DevicesSettings().backends == ["nvidia", "amd", "apple"]


def test_host_reader_matches_psutil() -> None:
    reader = HostReader()
    host = reader.read(taken_at=12.5)
    vm = psutil.virtual_memory()
    assert host.memory_total_bytes == vm.total
    assert host.memory_used_bytes == host.memory_total_bytes - host.memory_available_bytes
    assert abs(host.memory_available_bytes - vm.available) < 512 * 1024**2
    assert host.swap_total_bytes == psutil.swap_memory().total
    assert 0.0 <= host.cpu_utilization_ratio <= 1.0
    assert host.cpu_count >= 1 and host.taken_at == 12.5 and host.hostname
