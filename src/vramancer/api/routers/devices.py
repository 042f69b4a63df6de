"""``GET /v1/devices``: devices with their latest telemetry, from the cached snapshot, and who
holds what on each GPU (``devices/holders.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from vramancer.api.deps import RuntimeDep
from vramancer.api.schemas import Device, DeviceList
from vramancer.errors import NotFound

router = APIRouter(tags=["devices"])


@router.get("/v1/devices", response_model=DeviceList)
async def list_devices(rt: RuntimeDep) -> dict[str, Any]:
    """Every GPU (real ones first, then simulated ones) and the host, as last polled, each GPU
    with its memory reserved by VRAMancer, its external memory and its holders."""
    return rt.devices_report()


@router.get("/v1/devices/{index}", response_model=Device)
async def get_device(
    rt: RuntimeDep, index: Annotated[int, Path(ge=0, le=1_000_000)]
) -> dict[str, Any]:
    """One GPU by VRAMancer index (the index ``gpu: N`` pins tasks to)."""
    for entry in rt.devices_report()["devices"]:
        if entry["index"] == index:
            result: dict[str, Any] = entry
            return result
    raise NotFound(f"no device with index {index}")
