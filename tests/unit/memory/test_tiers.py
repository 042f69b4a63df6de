"""Tier resolution: which tiers exist on a machine, their budgets, latencies and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramancer.config import Settings
from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
from vramancer.errors import ConfigError
from vramancer.memory.settings import MemorySettings
from vramancer.memory.tiers import DEFAULT_LATENCY, CudaDevice, TierName, resolve_tiers

GIB = 1024**3


def snapshot(available: int = 16 * GIB, gpus: tuple[GpuSnapshot, ...] = ()) -> SystemSnapshot:
    host = HostSnapshot(
        cpu_count=8,
        cpu_utilization_ratio=0.1,
        memory_total_bytes=32 * GIB,
        memory_available_bytes=available,
        memory_used_bytes=32 * GIB - available,
        swap_total_bytes=0,
        swap_used_bytes=0,
    )
    return SystemSnapshot(host=host, gpus=gpus)


def test_cpu_only_machine_has_l4_l5_l6(tmp_path: Path) -> None:
    specs = resolve_tiers(MemorySettings(), data_dir=tmp_path, snapshot=snapshot(), cuda=[])
    assert [s.name for s in specs] == [TierName.L4, TierName.L5, TierName.L6]
    l4, l5, l6 = specs
    assert l4.capacity_bytes == int(16 * GIB * 0.25)
    assert l5.path == tmp_path / "l5" and l6.path == tmp_path / "l6"
    assert l5.capacity_bytes > 0 and l6.capacity_bytes > l5.capacity_bytes
    assert [s.latency for s in specs] == [5.0, 16.0, 50.0]
    assert (tmp_path / "l5").is_dir()


def test_gpu_machine_has_every_tier_with_derived_budgets(tmp_path: Path) -> None:
    cuda = [CudaDevice(0, 24 * GIB), CudaDevice(1, 12 * GIB), CudaDevice(2, 12 * GIB)]
    specs = resolve_tiers(MemorySettings(), data_dir=tmp_path, snapshot=snapshot(), cuda=cuda)
    by_name = {s.name: s for s in specs}
    assert list(by_name) == list(TierName)
    assert by_name[TierName.L1].capacity_bytes == 12 * GIB
    assert by_name[TierName.L1].devices == (0,)
    assert by_name[TierName.L2].capacity_bytes == 12 * GIB
    assert by_name[TierName.L2].devices == (1, 2)
    assert by_name[TierName.L3].capacity_bytes == int(16 * GIB * 0.05)
    assert [s.latency for s in specs] == [DEFAULT_LATENCY[n] for n in TierName]


def test_one_gpu_has_no_l2_and_simulated_gpus_make_no_tier(tmp_path: Path) -> None:
    specs = resolve_tiers(
        MemorySettings(), data_dir=tmp_path, snapshot=snapshot(), cuda=[CudaDevice(0, 8 * GIB)]
    )
    assert [s.name.value for s in specs] == ["L1", "L3", "L4", "L5", "L6"]
    sim = GpuSnapshot(
        index=0,
        uuid="sim-0",
        name="sim0",
        vendor=DeviceVendor.SIMULATED,
        memory_total_bytes=24 * GIB,
        memory_used_bytes=0,
        memory_free_bytes=24 * GIB,
    )
    specs = resolve_tiers(MemorySettings(), data_dir=tmp_path, snapshot=snapshot(gpus=(sim,)))
    assert TierName.L1 not in {s.name for s in specs}  # torch here has no CUDA: absent, not faked


def test_configured_capacity_path_latency_and_disabled(tmp_path: Path) -> None:
    settings = MemorySettings(
        tiers={
            "l4": {"capacity": "64MiB", "pressure_high": 0.8, "pressure_low": 0.5},
            "L5": {"capacity": "1GiB", "path": str(tmp_path / "ssd"), "latency": 3},
            "L6": {"enabled": False},
        }
    )
    specs = resolve_tiers(settings, data_dir=tmp_path / "data", snapshot=snapshot(), cuda=[])
    assert [s.name.value for s in specs] == ["L5", "L4"]  # fastest first, by latency
    l5, l4 = specs
    assert l5.capacity_bytes == GIB and l5.path == tmp_path / "ssd" and l5.latency == 3
    assert l4.capacity_bytes == 64 * 1024**2
    assert (l4.pressure_high, l4.pressure_low) == (0.8, 0.5)


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"tiers": {"L7": {}}}, "unknown tier"),
        ({"pressure_low": 0.95, "pressure_high": 0.9}, "pressure_low"),
        ({"tiers": {"L4": {"capacity": "lots"}}}, "memory.tiers.L4.capacity"),
        ({"eviction_interval": 3}, "unknown key"),
        ({"max_block_size": "-1"}, "max_block_size"),
    ],
)
def test_bad_memory_config_names_the_key(memory: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(memory=memory)
    assert message in err.value.message


def test_memory_keys_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_MEMORY__TIERS__L4__CAPACITY", "64MiB")
    monkeypatch.setenv("VRM_MEMORY__EVICTION_INTERVAL_S", "2.5")
    settings = Settings.load()
    assert settings.memory.tiers["L4"].capacity == 64 * 1024**2
    assert settings.memory.eviction_interval_s == 2.5


def test_each_capacity_says_where_it_came_from(tmp_path: Path) -> None:
    """The host tiers follow the memory free at start: the log says so and how to fix them."""
    derived = resolve_tiers(MemorySettings(), data_dir=tmp_path, snapshot=snapshot(), cuda=[])
    assert derived[0].origin == (
        "25% of the 16.0 GiB of host memory available at start; "
        "set [memory.tiers.L4] capacity to fix it"
    )
    assert derived[1].origin.startswith("25% of the ") and str(tmp_path / "l5") in derived[1].origin
    fixed = MemorySettings(tiers={"L4": {"capacity": "3GiB"}})
    for available in (16 * GIB, 2 * GIB):  # a configured capacity does not follow free memory
        l4 = resolve_tiers(fixed, data_dir=tmp_path, snapshot=snapshot(available), cuda=[])[0]
        assert (l4.capacity_bytes, l4.origin) == (3 * GIB, "[memory.tiers.L4] capacity")
