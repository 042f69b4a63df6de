"""The six tiers, their defaults, and how their budgets are resolved on this machine.

A tier a machine lacks is absent, never faked: L1/L2 need torch with CUDA and real (not
simulated) GPUs, L3 (pinned host memory) only serves copies to a GPU so it needs the same,
L4 (pageable host), L5 (block files on SSD) and L6 (compressed archive) are always there
unless disabled in the configuration.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from vramancer.devices.types import SystemSnapshot
from vramancer.files import private_dir
from vramancer.memory.settings import MemorySettings, TierSettings
from vramancer.units import format_size

log = logging.getLogger(__name__)


class TierName(StrEnum):
    """The tiers, fastest first."""

    #: Primary GPU VRAM (torch CUDA tensors).
    L1 = "L1"
    #: The other GPUs' VRAM.
    L2 = "L2"
    #: Pinned host memory (torch ``pin_memory``), the staging area for GPU copies.
    L3 = "L3"
    #: Pageable host memory (bytes, numpy arrays, CPU tensors). Volatile.
    L4 = "L4"
    #: Memory-mapped block files on a fast SSD.
    L5 = "L5"
    #: Cold archive: compressed block files, written atomically.
    L6 = "L6"


#: Relative latency of each tier (L1 = 1): the unit of the reload cost the eviction index weighs.
DEFAULT_LATENCY: dict[TierName, float] = {
    TierName.L1: 1.0,
    TierName.L2: 1.3,
    TierName.L3: 2.5,
    TierName.L4: 5.0,
    TierName.L5: 16.0,
    TierName.L6: 50.0,
}
#: Tiers whose blocks live in files and survive a restart.
DISK_TIERS = frozenset({TierName.L5, TierName.L6})
#: Tiers that need torch with CUDA.
CUDA_TIERS = frozenset({TierName.L1, TierName.L2, TierName.L3})


@dataclass(frozen=True, slots=True)
class CudaDevice:
    """A CUDA device the store may use: torch index and total memory."""

    index: int
    memory_total_bytes: int


@dataclass(frozen=True, slots=True)
class TierSpec:
    """A tier as resolved at start: present, with its budget, latency and where it lives."""

    name: TierName
    latency: float
    capacity_bytes: int
    pressure_high: float
    pressure_low: float
    #: Directory of block files (L5, L6).
    path: Path | None = None
    #: CUDA device indexes (L1: one, L2: the others).
    devices: tuple[int, ...] = field(default_factory=tuple)
    #: Where ``capacity_bytes`` came from, for people (the configuration, or a share of what
    #: the machine had at start).
    origin: str = ""


def cuda_devices(snapshot: SystemSnapshot) -> list[CudaDevice]:
    """Real CUDA devices usable through torch, primary first; empty without torch or CUDA.

    The device snapshot names the GPUs when the device layer knows them; when it lists none but
    torch sees CUDA, torch's own device list is used, so the tiers follow what torch can address.
    Without any sign of an NVIDIA GPU (none in the snapshot, no ``/dev/nvidiactl``) torch is not
    imported at all: it costs ~200 MiB of RSS and a second of start-up for nothing.
    """
    if not _cuda_possible(snapshot):
        return []
    try:
        import torch
    except ImportError:
        log.info("torch is not installed: no GPU memory tiers (pip install 'vramancer[torch]')")
        return []
    try:
        if not torch.cuda.is_available():
            return []
        count = int(torch.cuda.device_count())
    except Exception:  # a broken driver is "no CUDA", not a crash
        log.exception("torch.cuda failed; GPU tiers are absent")
        return []
    known = {
        g.cuda_index: g.memory_total_bytes
        for g in snapshot.gpus
        if g.cuda_index is not None and not g.simulated
    }
    found: list[CudaDevice] = []
    for index in range(count):
        total = known.get(index)
        if total is None:
            total = int(torch.cuda.get_device_properties(index).total_memory)
        found.append(CudaDevice(index, int(total)))
    return found


def _cuda_possible(snapshot: SystemSnapshot) -> bool:
    if any(g.cuda_index is not None and not g.simulated for g in snapshot.gpus):
        return True
    return "torch" in sys.modules or Path("/dev/nvidiactl").exists()


def _disk_free(path: Path) -> int:
    private_dir(path)
    return int(shutil.disk_usage(path).free)


def tier_dir(settings: MemorySettings, name: TierName, data_dir: Path) -> Path | None:
    """Where the block files of a disk tier live (``[memory.tiers.L5] path`` or
    ``<data_dir>/l5``); None for a memory tier or a disabled one."""
    if name not in DISK_TIERS:
        return None
    conf = settings.tiers.get(name.value, TierSettings())
    if not conf.enabled:
        return None
    return (conf.path or data_dir / name.value.lower()).expanduser()


def resolve_tiers(
    settings: MemorySettings,
    *,
    data_dir: Path,
    snapshot: SystemSnapshot,
    cuda: list[CudaDevice] | None = None,
) -> list[TierSpec]:
    """The tiers present on this machine, fastest first, with their budgets resolved."""
    devices = cuda_devices(snapshot) if cuda is None else cuda
    derive = settings.derive
    host_available = snapshot.host.memory_available_bytes
    specs: list[TierSpec] = []
    for name in TierName:
        conf = settings.tiers.get(name.value, TierSettings())
        if not conf.enabled:
            continue
        if name in CUDA_TIERS and not devices:
            continue
        if name is TierName.L2 and len(devices) < 2:
            continue
        path: Path | None = None
        tier_devices: tuple[int, ...] = ()
        if name is TierName.L1:
            tier_devices = (devices[0].index,)
            fraction, whole = derive.gpu_fraction, devices[0].memory_total_bytes
            basis = f"of the {format_size(whole)} of cuda:{devices[0].index}"
        elif name is TierName.L2:
            tier_devices = tuple(d.index for d in devices[1:])
            fraction = derive.other_gpu_fraction
            whole = sum(d.memory_total_bytes for d in devices[1:])
            basis = f"of the {format_size(whole)} of the other GPUs"
        elif name in (TierName.L3, TierName.L4):
            fraction = derive.pinned_fraction if name is TierName.L3 else derive.host_fraction
            whole = host_available
            basis = f"of the {format_size(whole)} of host memory available at start"
        else:
            path = tier_dir(settings, name, data_dir)
            assert path is not None
            fraction = derive.l5_disk_fraction if name is TierName.L5 else derive.l6_disk_fraction
            whole = 0 if conf.capacity is not None else _disk_free(path)
            basis = f"of the {format_size(whole)} free on the disk of {path}"
        if conf.capacity is not None:
            capacity, origin = conf.capacity, f"[memory.tiers.{name.value}] capacity"
        else:
            capacity = int(whole * fraction)
            origin = f"{fraction:.0%} {basis}; set [memory.tiers.{name.value}] capacity to fix it"
        high = conf.pressure_high if conf.pressure_high is not None else settings.pressure_high
        low = conf.pressure_low if conf.pressure_low is not None else settings.pressure_low
        specs.append(
            TierSpec(
                name=name,
                latency=conf.latency if conf.latency is not None else DEFAULT_LATENCY[name],
                capacity_bytes=int(capacity),
                pressure_high=high,
                pressure_low=min(low, high),
                path=path,
                devices=tier_devices,
                origin=origin,
            )
        )
    specs.sort(key=lambda s: s.latency)
    return specs
