"""Model lifecycle routes: ``GET /v1/models``, ``GET /v1/models/{name}/status`` and
``POST /v1/models/{name}/load | unload | migrate`` (operator role). (One model's status has its
own suffix: a bare ``GET /v1/models/{name}`` would shadow ``GET /v1/models/recommend``.)

A model: ``name``, ``backend``, ``state`` (unloaded, loading, loaded, unloading, error),
``device`` (``cpu`` / ``gpu:N``, null when unloaded), ``runs_on``, ``simulated``,
``last_used`` (ISO 8601) and more (see ``ModelStatus``). Errors: unknown model 404, bad device
422, not enough VRAM 409 (free MB, needed MB, what could be unloaded, ``held_by`` the other
allocations), backend down 503 with the reason, backend error 502, timeout 504. Model names
may contain ``/`` (``ns/model:tag``). The advice routes ``/v1/models/can-load`` and
``/v1/models/recommend`` live in ``system``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.deps import Operator, RuntimeDep
from vramancer.api.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


class LoadBody(BaseModel):
    """``POST /v1/models/{name}/load`` body (optional)."""

    model_config = ConfigDict(extra="forbid")

    #: ``cpu``, ``gpu`` (any GPU) or ``gpu:N`` (``cuda:N``: the same GPU); none: the manager
    #: chooses.
    device: str | None = Field(default=None, min_length=1, max_length=32)


class MigrateBody(BaseModel):
    """``POST /v1/models/{name}/migrate`` body."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(min_length=1, max_length=32)


@router.get("/v1/models", response_model=ModelList)
async def list_models(rt: RuntimeDep) -> dict[str, Any]:
    """Every managed model with its state and placement, the profile in force, degraded mode."""
    models = rt.models
    return {
        "models": [s.as_dict() for s in models.list_models()],
        "profile": models.profile,
        "degraded_mode": models.degraded,
        "degraded_reason": models.degraded_reason,
    }


@router.get("/v1/models/{name:path}/status", response_model=ModelInfo)
async def model_status(rt: RuntimeDep, name: str) -> dict[str, Any]:
    """One model (what ``list`` shows for it)."""
    return rt.models.status(name).as_dict()


@router.post("/v1/models/{name:path}/load", response_model=ModelInfo)
async def load_model(
    rt: RuntimeDep, name: str, _: Operator, body: LoadBody | None = None
) -> dict[str, Any]:
    """Load ``name`` (on ``device`` if given); answers once it is loaded."""
    device = body.device if body is not None else None
    return (await rt.models.ensure_loaded(name, device)).as_dict()


@router.post("/v1/models/{name:path}/unload", response_model=ModelInfo)
async def unload_model(rt: RuntimeDep, name: str, _: Operator) -> dict[str, Any]:
    """Unload ``name`` once its users are done; answers once it is unloaded."""
    return (await rt.models.ensure_unloaded(name)).as_dict()


@router.post("/v1/models/{name:path}/migrate", response_model=ModelInfo)
async def migrate_model(
    rt: RuntimeDep, name: str, body: MigrateBody, _: Operator
) -> dict[str, Any]:
    """Put ``name`` on ``device`` (torch models move in place; others reload there)."""
    return (await rt.models.migrate(name, body.device)).as_dict()
