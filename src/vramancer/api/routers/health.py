"""``/healthz`` (no auth) and ``/metrics`` (viewer, when tokens are configured)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from vramancer._version import __version__
from vramancer.api.deps import RuntimeDep, require
from vramancer.api.schemas import Health
from vramancer.config import Role
from vramancer.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(rt: RuntimeDep) -> Health:
    """Liveness: the process answers and its runtime has started."""
    nats = rt.pool.conn.state if rt.pool is not None else None
    return Health(status="ok" if rt.running else "starting", version=__version__, nats=nats)


@router.get(
    "/metrics",
    dependencies=[Depends(require(Role.VIEWER))],
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition (format 0.0.4).",
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text exposition of every ``vramancer_*`` metric."""
    return Response(rt.metrics.render(), media_type=CONTENT_TYPE)
