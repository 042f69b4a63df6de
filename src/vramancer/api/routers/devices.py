"""``GET /v1/devices``: devices with their latest telemetry, from the cached snapshot, and who
holds what on each GPU (``devices/holders.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from vramancer.api.deps import RuntimeDep, Viewer
from vramancer.api.guard import Principal
from vramancer.api.schemas import Device, DeviceList
from vramancer.config import Role
from vramancer.devices.holders import HolderKind
from vramancer.errors import NotFound
from vramancer.tasks.holders import hidden_label
from vramancer.tasks.model import owner_of

router = APIRouter(tags=["devices"])


@router.get("/v1/devices", response_model=DeviceList)
async def list_devices(rt: RuntimeDep, principal: Viewer) -> dict[str, Any]:
    """Every GPU (real ones first, then simulated ones) and the host, as last polled, each GPU
    with its memory reserved by VRAMancer, its external memory and its holders."""
    report = rt.devices_report()
    return {**report, "devices": [_shown(d, principal) for d in report["devices"]]}


def _shown(device: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """``device`` as ``principal`` may see it: a task holder's label says what the task runs
    to its owner and admins only (as the task's status shows its code)."""
    holders = device.get("holders")
    if not holders or principal.role.allows(Role.ADMIN):
        return device
    me = owner_of(principal.token)
    shown = [
        {**h, "name": hidden_label(h["name"])}
        if h["kind"] == HolderKind.TASK.value and h["owner"] != me
        else h
        for h in holders
    ]
    return {**device, "holders": shown}


@router.get("/v1/devices/{index}", response_model=Device)
async def get_device(
    rt: RuntimeDep, principal: Viewer, index: Annotated[int, Path(ge=0, le=1_000_000)]
) -> dict[str, Any]:
    """One GPU by VRAMancer index (the index ``gpu: N`` pins tasks to)."""
    for entry in rt.devices_report()["devices"]:
        if entry["index"] == index:
            return _shown(entry, principal)
    raise NotFound(f"no device with index {index}")
