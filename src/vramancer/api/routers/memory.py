"""Routes for the tiered block store: ``/v1/memory/...``.

Blocks travel as raw bytes (``application/octet-stream``). Ids may contain ``/`` (the path
parameter takes the rest of the path); allowed: letters, digits and ``. _ : / -``, 1 to 256
characters. Putting and deleting need the operator role, forced eviction the admin role.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.deps import Admin, Operator, RuntimeDep
from vramancer.api.schemas import BlockDeleted, BlockPage, BlockStored, EvictReport, TierList
from vramancer.errors import InvalidInput
from vramancer.memory.store import MAX_LIST_OFFSET, MAX_PRIORITY, BlockTooLarge, check_block_id
from vramancer.units import Size, format_size

router = APIRouter(prefix="/v1/memory", tags=["memory"])

#: The headers that describe a block read back (``GET /v1/memory/blocks/{id}``).
_BLOCK_HEADERS = {
    "X-VRM-Tier": "The tier the block is in after this read (a read may promote it).",
    "X-VRM-Kind": "bytes, numpy or torch: how the bytes are rebuilt.",
    "X-VRM-Dtype": "The element type (uint8 for plain bytes).",
    "X-VRM-Shape": "The dimensions, comma-separated.",
}


#: Bytes or a size string (``"512MiB"``); an infinite or over-long size is a 422.
EvictSize = Size


class EvictRequest(BaseModel):
    """Forced eviction: a tier and bytes to free, or nothing for a forced cycle on all tiers."""

    model_config = ConfigDict(extra="forbid")

    tier: str | None = Field(default=None, pattern=r"^[Ll][1-6]$")
    bytes: EvictSize | None = None


@router.get("/tiers", response_model=TierList)
async def list_tiers(rt: RuntimeDep) -> dict[str, Any]:
    """Each present tier: name, capacity, use, blocks, latency; and the move totals."""
    stats = rt.memory.stats()
    tiers = stats.pop("tiers")
    return {"tiers": tiers, "totals": stats}


@router.get("/blocks", response_model=BlockPage)
async def list_blocks(
    rt: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
    tier: Annotated[str | None, Query(pattern=r"^[Ll][1-6]$")] = None,
) -> dict[str, Any]:
    """A page of blocks, oldest first: ``id``, ``size``, ``tier``, ``pinned``, ``priority``..."""
    items, total = rt.memory.list_blocks(limit=limit, offset=offset, tier=tier)
    end = offset + len(items)
    return {
        "items": items,
        "total": total,
        "offset": offset,
        "limit": limit,
        "next_offset": end if end < total else None,
    }


@router.put(
    "/blocks/{block_id:path}",
    response_model=BlockStored,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def put_block(
    block_id: str,
    request: Request,
    rt: RuntimeDep,
    _: Operator,
    priority: Annotated[int, Query(ge=0, le=MAX_PRIORITY)] = 0,
    hint: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    durable: Annotated[bool | None, Query()] = None,
) -> dict[str, Any]:
    """Store the raw request body as block ``block_id`` (replacing one of that id).

    ``durable=true`` (default ``memory.durable_puts``): the block goes to L5/L6 and the answer
    comes once its file, directory and catalog row are fsynced. The answer says where the
    block is (``tier``) and whether it survives a crash (``durable``).

    Errors: 413 ``payload_too_large`` over ``min(memory.max_block_size, server.max_body)``,
    422 for an empty body or a bad id, priority or hint, 409 ``insufficient_memory`` when no
    tier has room, 507 ``insufficient_storage`` when the disk is full (in both cases nothing
    changed: the previous block of that id, if any, stays)."""
    check_block_id(block_id)
    limit = min(rt.settings.memory.max_block_size, rt.settings.server.max_body)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BlockTooLarge(
                f"block body is over the limit of {format_size(limit)}",
                max_bytes=limit,
            )
    if not body:
        raise InvalidInput("the request body (the block's bytes) is empty", field="body")
    receipt = await asyncio.to_thread(
        partial(rt.memory.put_receipt, block_id, body, priority, hint, durable=durable)
    )
    return {
        "id": block_id,
        "size": len(body),
        "tier": receipt.tier,
        "priority": priority,
        "durable": receipt.durable,
    }


@router.get(
    "/blocks/{block_id:path}",
    response_class=Response,
    responses={
        200: {
            "description": "The block's bytes.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "headers": {
                name: {"description": what, "schema": {"type": "string"}}
                for name, what in _BLOCK_HEADERS.items()
            },
        }
    },
)
async def get_block(block_id: str, rt: RuntimeDep) -> Response:
    """The block's bytes; ``X-VRM-Tier``/``-Kind``/``-Dtype``/``-Shape`` describe it (the tier
    is where the block is after this read, which may have promoted it).

    Errors: 404 for an unknown block; 409 ``corrupt_block`` when its stored copy fails its
    checksum or cannot be decoded (that block only: replace or delete it); 409
    ``codec_unavailable`` when its codec's package (python-blosc2) is not installed here."""
    check_block_id(block_id)
    raw, info = await asyncio.to_thread(rt.memory.read_bytes, block_id)
    headers = {
        "X-VRM-Tier": str(info.get("tier", "")),
        "X-VRM-Kind": str(info.get("kind", "bytes")),
        "X-VRM-Dtype": str(info.get("dtype", "uint8")),
        "X-VRM-Shape": ",".join(str(d) for d in info.get("shape", [len(raw)])),
    }
    return Response(raw, media_type="application/octet-stream", headers=headers)


@router.delete("/blocks/{block_id:path}", response_model=BlockDeleted)
async def delete_block(block_id: str, rt: RuntimeDep, _: Operator) -> dict[str, Any]:
    """Remove the block (404 if unknown). Works on a full disk: the file goes first."""
    check_block_id(block_id)
    await asyncio.to_thread(rt.memory.delete, block_id)
    return {"id": block_id, "deleted": True}


@router.post("/evict", response_model=EvictReport)
async def force_evict(rt: RuntimeDep, _: Admin, body: EvictRequest | None = None) -> dict[str, Any]:
    """Forced eviction (admin): free ``bytes`` from ``tier``, or a forced cycle everywhere."""
    request = body or EvictRequest()
    report = await asyncio.to_thread(
        rt.memory.evict, request.tier.upper() if request.tier else None, request.bytes
    )
    return {"tier": request.tier.upper() if request.tier else None, **report}
