"""The JSON body of ``GET /v1/devices`` (also what ``vramancer status --json`` prints)."""

from __future__ import annotations

from typing import Any

from vramancer.devices.types import SystemSnapshot


def devices_report(snapshot: SystemSnapshot, node: str) -> dict[str, Any]:
    """Every GPU with its latest telemetry (``backend`` = metric label), and the host."""
    devices = []
    for gpu in snapshot.gpus:
        entry = gpu.as_dict()
        entry["backend"] = gpu.vendor.value
        total = gpu.memory_total_bytes
        entry["memory_used_ratio"] = round(gpu.memory_used_bytes / total, 4) if total else 0.0
        devices.append(entry)
    return {
        "node": node,
        "taken_at": snapshot.taken_at,
        "cpu_only": snapshot.cpu_only,
        "host": snapshot.host.as_dict(),
        "devices": devices,
    }
