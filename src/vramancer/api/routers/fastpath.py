"""``GET /v1/fastpath``: the links to the other nodes' fastpath and which one carries blocks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vramancer.api.deps import RuntimeDep
from vramancer.api.schemas_cluster import FastpathReport

router = APIRouter(tags=["fastpath"])


@router.get("/v1/fastpath", response_model=FastpathReport)
async def fastpath(rt: RuntimeDep) -> dict[str, Any]:
    """Per peer and interface the last measured latency and bandwidth (``best``: the link a
    block from that peer takes). ``enabled`` false when ``[fastpath] port`` is not set."""
    if rt.fastpath is None:
        return {"enabled": False, "address": None, "interfaces": [], "peers": [], "links": []}
    return rt.fastpath.report()
