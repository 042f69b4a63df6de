"""``GET /v1/gateway``: each managed model's requests at the gateway now (queued, in flight)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request

from vramancer.api.deps import RuntimeDep
from vramancer.api.schemas_cluster import GatewayQueues

router = APIRouter(tags=["gateway"])


@router.get("/v1/gateway", response_model=GatewayQueues)
async def gateway_queues(request: Request, rt: RuntimeDep) -> dict[str, Any]:
    """Per managed model: requests waiting to be admitted (``queued``, and how long the oldest
    has waited), and requests being answered (``in_flight``: they hold the model resident).
    All zero before the gateway's first request."""
    front = getattr(request.app.state, "gateway_front", None)
    if front is None:
        rows = [
            {"model": name, "queued": 0, "in_flight": 0, "oldest_wait_s": None}
            for name in rt.models.specs
        ]
    else:
        rows = [asdict(q) for q in front.gateway.queues()]
    return {"models": rows}
