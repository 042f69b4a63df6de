"""``GET /v1/gpu/status``: the VLM/CLIP view of the GPUs (``GpuResourceStatus``).

``execution_mode`` (the profile in force), ``vlm_state``, ``vlm_model``, ``clip_device``
(``cpu`` / ``gpu:N``, as every answer names a device), ``vram`` (``total_mb``, ``used_mb``,
``free_mb``, ``gpu_name``,
``gpu_utilization_percent`` of the VLM's GPU, else the first), ``idle_timeout_seconds``,
``last_vlm_request`` (ISO 8601 or null), ``degraded_mode``, ``degraded_reason``; plus
``cpu_only`` and ``simulated``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vramancer.api.deps import RuntimeDep
from vramancer.api.schemas import GpuStatus

router = APIRouter(tags=["gpu"])


@router.get("/v1/gpu/status", response_model=GpuStatus)
async def gpu_status(rt: RuntimeDep) -> dict[str, Any]:
    """The GPU resource manager's status; every field always has a value."""
    return rt.models.gpu_status().as_dict()
