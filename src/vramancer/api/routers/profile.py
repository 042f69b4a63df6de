"""``GET /v1/profile`` and ``PUT /v1/profile`` (operator): the execution profile (the
built-in modes ``idle``, ``recording``, ``autopilot``, and any ``[profiles.NAME]``).

``PUT {"name": "autopilot"}`` reconciles the models (VRAM is freed first, then models load) and
answers the steps it took. ``"dry_run": true`` answers the plan without running it. A step that
fails stops the switch: 409 ``profile_switch_failed`` (503 when a backend is down) with
``failed_step`` and every step's status; the profile in force stays the previous one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.deps import Operator, RuntimeDep
from vramancer.api.schemas import ProfilePlan, ProfileState, SwitchReport

router = APIRouter(tags=["profile"])


class ProfileBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    #: Answer the plan only.
    dry_run: bool = False


@router.get("/v1/profile", response_model=ProfileState)
async def get_profile(rt: RuntimeDep) -> dict[str, Any]:
    """The profile in force, every profile's placements, and the last switch's report."""
    models = rt.models
    last = models.last_switch
    return {
        "name": models.profile,
        "profiles": models.profiles(),
        "last_switch": last.as_dict() if last is not None else None,
    }


@router.put("/v1/profile", response_model=SwitchReport | ProfilePlan)
async def put_profile(rt: RuntimeDep, body: ProfileBody, _: Operator) -> dict[str, Any]:
    """Switch to profile ``name`` (or plan it with ``dry_run``)."""
    models = rt.models
    if body.dry_run:
        plan = models.plan_profile(body.name)
        return {
            "name": plan.profile,
            "dry_run": True,
            "steps": [
                {
                    "action": s.action.value,
                    "model": s.model,
                    "device": s.device,
                    "reason": s.reason,
                    "description": s.describe(),
                }
                for s in plan.steps
            ],
            "notes": list(plan.notes),
        }
    return (await models.switch_profile(body.name, strict=True)).as_dict()
