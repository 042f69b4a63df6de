"""Resource routes: ``/v1/system/resources``, ``/v1/system/optimize``, and the model advice
routes ``/v1/models/can-load`` and ``/v1/models/recommend``.

``/v1/system/resources`` reads the cached snapshot only (no driver call on a request).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.deps import Operator, RuntimeDep
from vramancer.api.schemas import OptimizeResult, SystemResources
from vramancer.resources.orchestrator import MAX_ESTIMATED_SIZE_MB

router = APIRouter(tags=["system"])


class CanLoadRequest(BaseModel):
    """``POST /v1/models/can-load`` body."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str = Field(min_length=1, max_length=512, pattern=r"\S")
    #: Expected size in MiB.
    estimated_size_mb: float = Field(ge=0, le=MAX_ESTIMATED_SIZE_MB, allow_inf_nan=False)


class CanLoadResponse(BaseModel):
    can_load: bool
    reason: str
    required_bytes: int
    device: str | None
    device_index: int | None
    available_bytes: int


class RecommendResponse(BaseModel):
    method: str
    reason: str
    platform: str
    required_bytes: int | None
    available_bytes: int | None
    n_gpu_layers: int | None
    offload_kqv: bool | None


@router.get("/v1/system/resources", response_model=SystemResources)
async def system_resources(rt: RuntimeDep) -> dict[str, Any]:
    """CPU, RAM, swap and every GPU with pressure flags (``check_resources()``)."""
    return rt.resources.check_resources()


@router.post("/v1/system/optimize", response_model=OptimizeResult)
async def system_optimize(rt: RuntimeDep, _: Operator) -> dict[str, Any]:
    """GC, allocator cache release and model-manager optimisation; operator role."""
    return await rt.resources.optimize_resources()


@router.post("/v1/models/can-load")
async def can_load(rt: RuntimeDep, body: CanLoadRequest) -> CanLoadResponse:
    """Would a model of ``estimated_size_mb`` MiB fit now, on which device, and why."""
    decision = rt.resources.can_load_model(body.model_id, body.estimated_size_mb)
    return CanLoadResponse(**decision.as_dict())


@router.get("/v1/models/recommend")
async def recommend(
    rt: RuntimeDep,
    model_id: Annotated[str, Query(min_length=1, max_length=512, pattern=r"\S")],
    params: Annotated[
        str | None, Query(max_length=32, description="Parameter count, e.g. 7B or 350M")
    ] = None,
    gguf: Annotated[
        bool, Query(description="The model is a GGUF file (llama.cpp), whatever its name says")
    ] = False,
) -> RecommendResponse:
    """Quantization advice for this machine (size from ``params`` or the model id)."""
    rec = rt.resources.recommend_quantization_method(model_id, params=params, gguf=gguf)
    return RecommendResponse(**rec.as_dict())
