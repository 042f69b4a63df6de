"""HA replication routes: ``/v1/ha/...`` (see docs/ha.md).

* ``POST /v1/ha/deltas``: peer to peer. The body is sealed records, concatenated
  (``application/octet-stream``); their signatures (HMAC under the hour key of the shared
  ``VRM_HA_SECRET``) are the authentication, so the auth middleware lets this route through
  without a bearer token (rate and body limits still apply). A refused batch applies nothing:
  401 ``bad_signature`` / ``stale_key``, 409 ``replayed`` / ``stale_epoch`` / ``gap`` /
  ``not_standby``, 400 ``corrupt``; every answer carries ``acked_seq``, ``epoch`` and ``role``.
  An empty body only asks where the node stands (how a starting node learns its peers' epochs).
* ``GET /v1/ha/status`` (viewer), ``POST /v1/ha/promote`` and ``POST /v1/ha/rotate`` (admin).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from vramancer.api.deps import Admin, RuntimeDep
from vramancer.api.schemas import ERROR_RESPONSES
from vramancer.api.schemas_cluster import HaAck, HaStatus
from vramancer.errors import Conflict, InvalidInput
from vramancer.replication.service import HaService
from vramancer.replication.shipper import ADDRESS_HEADER

router = APIRouter(prefix="/v1/ha", tags=["ha"])
#: The peer route, mounted without the viewer dependency (signatures authenticate it).
peer_router = APIRouter(prefix="/v1/ha", tags=["ha"], responses=ERROR_RESPONSES)

DISABLED: dict[str, Any] = {
    "enabled": False,
    "role": None,
    "epoch": 0,
    "last_seq": 0,
    "journal_bytes": 0,
    "peers": [],
}


class HaOff(Conflict):
    """A replication route was called on a node where replication is off (409 ``ha_off``)."""

    code = "ha_off"


def _ha(rt: Any) -> HaService:
    ha: HaService | None = rt.ha
    if ha is None:
        raise HaOff("HA replication is off on this node (VRM_HA_REPLICATION=1 turns it on)")
    return ha


@peer_router.post(
    "/deltas",
    response_model=HaAck,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def receive_deltas(request: Request, rt: RuntimeDep) -> dict[str, Any]:
    """Verify, apply and journal a batch of deltas (a standby); the acked seq."""
    ha = _ha(rt)
    body = await request.body()
    advertised = request.headers.get(ADDRESS_HEADER)
    if advertised is not None and len(advertised) > 300:
        raise InvalidInput(f"{ADDRESS_HEADER}: too long", field=ADDRESS_HEADER)
    return await ha.receive(body, advertised)


@router.get("/status", response_model=HaStatus)
async def ha_status(rt: RuntimeDep) -> dict[str, Any]:
    """Role, epoch, journal and peers (``enabled: false`` when replication is off)."""
    ha: HaService | None = rt.ha
    return DISABLED if ha is None else ha.status()


@router.post("/promote", response_model=HaStatus)
async def promote(rt: RuntimeDep, _: Admin) -> dict[str, Any]:
    """Turn this standby primary (the epoch goes up by one); a primary stays as it is."""
    return await _ha(rt).promote()


@router.post("/rotate", response_model=HaStatus)
async def rotate(rt: RuntimeDep, _: Admin) -> dict[str, Any]:
    """Start a new journal segment now."""
    return await _ha(rt).rotate()
