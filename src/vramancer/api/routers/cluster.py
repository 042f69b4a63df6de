"""``GET /v1/cluster/nodes``: every node of the pool, its GPUs, heartbeat and running tasks.

Without a pool (no ``[nats] url``) the list holds this machine alone, in the same shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vramancer.api.deps import RuntimeDep
from vramancer.api.schemas_cluster import ClusterNodes
from vramancer.devices.ids import DeviceId

router = APIRouter(tags=["cluster"])


@router.get("/v1/cluster/nodes", response_model=ClusterNodes)
async def list_nodes(rt: RuntimeDep) -> dict[str, Any]:
    """Nodes sorted by name; ``state`` is ``up``, ``stale`` (no heartbeat for ``[nats]
    stale_after_s``: no new work) or ``down``. Answered from what this daemon last heard while
    NATS is unreachable."""
    if rt.pool is not None:
        report: dict[str, Any] = rt.pool.registry.report()
        return report
    snapshot = rt.devices.snapshot()
    node = rt.settings.node_name
    devices = [
        {
            "id": str(DeviceId.gpu(g.index, node)),
            "index": g.index,
            "name": g.name,
            "memory_total_bytes": g.memory_total_bytes,
            "memory_used_bytes": g.memory_used_bytes,
            "memory_free_bytes": g.memory_free_bytes,
            "simulated": g.simulated,
        }
        for g in snapshot.gpus
    ]
    here = {
        "name": node,
        "state": "up",
        "last_heartbeat": rt.clock.time(),
        "devices": devices,
        "running_tasks": len(rt.tasks.workers.active),
        "orchestrator": True,
    }
    return {"nodes": [here]}
