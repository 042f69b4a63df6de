"""AMD GPUs through amdsmi when it is importable, else through the amdgpu driver's sysfs files.

sysfs: ``/sys/class/drm/card<N>/device/`` holds ``gpu_busy_percent``, ``mem_info_vram_total``
and ``mem_info_vram_used`` (bytes); ``hwmon/hwmon*/temp1_input`` (millidegrees Celsius) and
``power1_average`` or ``power1_input`` (microwatts). The root is a parameter so tests read a
fake tree in a temporary directory.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramancer.devices.backend import DeviceQueryError
from vramancer.devices.types import DeviceVendor, GpuSnapshot

log = logging.getLogger(__name__)

DRM_ROOT = Path("/sys/class/drm")
#: PCI vendor id of AMD/ATI in ``device/vendor``.
AMD_PCI_VENDOR = "0x1002"
_CARD_RE = re.compile(r"^card(\d+)$")
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SysfsCard:
    """One amdgpu card found under the DRM root."""

    card: int
    device_dir: Path
    uuid: str
    name: str


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeviceQueryError(f"reading {path} failed: {exc}") from exc


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise DeviceQueryError(f"{path} holds {text!r}, not an integer") from exc


def _uevent(device_dir: Path) -> dict[str, str]:
    text = _read_text(device_dir / "uevent") or ""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def discover_sysfs(root: Path = DRM_ROOT) -> list[SysfsCard]:
    """The AMD cards under ``root`` that report VRAM, in card order (connectors skipped)."""
    if not root.is_dir():
        return []
    cards = []
    for entry in root.iterdir():
        match = _CARD_RE.match(entry.name)
        device_dir = entry / "device"
        if not match or _read_text(device_dir / "vendor") != AMD_PCI_VENDOR:
            continue
        if not (device_dir / "mem_info_vram_total").exists():
            continue
        card = int(match.group(1))
        unique = _read_text(device_dir / "unique_id")
        slot = _uevent(device_dir).get("PCI_SLOT_NAME")
        uuid = f"amd-{unique or slot or f'card{card}'}"
        product = _read_text(device_dir / "product_name")
        pci_id = _read_text(device_dir / "device")
        name = product or (f"AMD GPU {pci_id}" if pci_id else "AMD GPU")
        cards.append(SysfsCard(card=card, device_dir=device_dir, uuid=uuid, name=name))
    return sorted(cards, key=lambda c: c.card)


def _hwmon_value(device_dir: Path, names: tuple[str, ...]) -> int | None:
    hwmon = device_dir / "hwmon"
    if not hwmon.is_dir():
        return None
    for sensor_dir in sorted(hwmon.iterdir()):
        for name in names:
            value = _read_int(sensor_dir / name)
            if value is not None:
                return value
    return None


def read_sysfs_card(card: SysfsCard, local_index: int) -> GpuSnapshot:
    """Read one card's memory, busy percentage, temperature and power from sysfs."""
    d = card.device_dir
    total = _read_int(d / "mem_info_vram_total")
    used = _read_int(d / "mem_info_vram_used")
    if total is None or used is None:
        raise DeviceQueryError(f"{d} no longer reports VRAM (device removed?)")
    busy = _read_int(d / "gpu_busy_percent")
    temp_milli = _hwmon_value(d, ("temp1_input",))
    power_micro = _hwmon_value(d, ("power1_average", "power1_input"))
    return GpuSnapshot(
        index=local_index,
        uuid=card.uuid,
        name=card.name,
        vendor=DeviceVendor.AMD,
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=max(0, total - used),
        utilization_ratio=None if busy is None else busy / 100.0,
        temperature_celsius=None if temp_milli is None else temp_milli / 1000.0,
        power_watts=None if power_micro is None else power_micro / 1_000_000.0,
        cuda_index=local_index,  # ROCm builds of torch name AMD GPUs cuda:N in this order
    )


class SysfsAmdBackend:
    """AMD GPUs read from sysfs files (no library needed)."""

    vendor = DeviceVendor.AMD

    def __init__(self, cards: list[SysfsCard]) -> None:
        self.cards = cards

    @classmethod
    def open(cls, root: Path = DRM_ROOT) -> SysfsAmdBackend | None:
        cards = discover_sysfs(root)
        return cls(cards) if cards else None

    def device_count(self) -> int:
        return len(self.cards)

    def read(self, local_index: int) -> GpuSnapshot:
        return read_sysfs_card(self.cards[local_index], local_index)

    def close(self) -> None:
        return None


def load_amdsmi() -> Any | None:
    """The ``amdsmi`` module (ROCm), or ``None`` when it is not installed."""
    try:
        import amdsmi
    except ImportError:
        return None
    return amdsmi


class AmdSmiBackend:
    """AMD GPUs read through ROCm's amdsmi library (passed in, so tests can fake it)."""

    vendor = DeviceVendor.AMD

    def __init__(self, smi: Any, handles: list[Any], uuids: list[str], names: list[str]):
        self._smi = smi
        self._handles = handles
        self._uuids = uuids
        self._names = names
        self._closed = False

    @classmethod
    def open(cls, smi: Any | None = None) -> AmdSmiBackend | None:
        smi = smi if smi is not None else load_amdsmi()
        if smi is None:
            return None
        try:
            smi.amdsmi_init()
        except smi.AmdSmiException as exc:
            log.info("AMD: amdsmi is not usable (%s); trying sysfs", exc)
            return None
        try:
            handles = list(smi.amdsmi_get_processor_handles())
            uuids = [f"amd-{smi.amdsmi_get_gpu_device_uuid(h)}" for h in handles]
            names = [
                str(smi.amdsmi_get_gpu_asic_info(h).get("market_name") or "AMD GPU")
                for h in handles
            ]
        except smi.AmdSmiException as exc:
            log.info("AMD: listing GPUs through amdsmi failed (%s); trying sysfs", exc)
            cls(smi, [], [], []).close()
            return None
        if not handles:
            smi.amdsmi_shut_down()
            return None
        return cls(smi, handles, uuids, names)

    def device_count(self) -> int:
        return len(self._handles)

    def _optional(self, fn_name: str, *args: Any) -> Any | None:
        try:
            return getattr(self._smi, fn_name)(*args)
        except self._smi.AmdSmiException:
            return None

    def read(self, local_index: int) -> GpuSnapshot:
        smi, handle = self._smi, self._handles[local_index]
        try:
            vram = smi.amdsmi_get_gpu_vram_usage(handle)
        except smi.AmdSmiException as exc:
            raise DeviceQueryError(f"amdsmi_get_gpu_vram_usage failed: {exc}") from exc
        total = int(vram["vram_total"]) * _MIB
        used = int(vram["vram_used"]) * _MIB
        activity = self._optional("amdsmi_get_gpu_activity", handle) or {}
        temp = self._optional(
            "amdsmi_get_temp_metric",
            handle,
            smi.AmdSmiTemperatureType.EDGE,
            smi.AmdSmiTemperatureMetric.CURRENT,
        )
        power = self._optional("amdsmi_get_power_info", handle) or {}
        watts = _number(power.get("average_socket_power"), 1.0)
        if watts is None:  # some boards only report the instantaneous value
            watts = _number(power.get("current_socket_power"), 1.0)
        busy = activity.get("gfx_activity")
        return GpuSnapshot(
            index=local_index,
            uuid=self._uuids[local_index],
            name=self._names[local_index],
            vendor=DeviceVendor.AMD,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=max(0, total - used),
            utilization_ratio=_number(busy, 100.0),
            temperature_celsius=_number(temp, 1.0),
            power_watts=watts,
            cuda_index=local_index,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._smi.amdsmi_shut_down()
            except self._smi.AmdSmiException as exc:
                log.debug("amdsmi_shut_down failed: %s", exc)


def _number(value: Any, divisor: float) -> float | None:
    """amdsmi reports "N/A" for values a GPU lacks; that is ``None`` here."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / divisor
    return None


def open_amd(
    root: Path = DRM_ROOT, smi: Any | None = None
) -> AmdSmiBackend | SysfsAmdBackend | None:
    """amdsmi first, then sysfs; ``None`` when neither finds an AMD GPU."""
    return AmdSmiBackend.open(smi) or SysfsAmdBackend.open(root)
