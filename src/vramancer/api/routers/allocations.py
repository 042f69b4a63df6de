"""Arbiter routes: ``/v1/allocations`` (list, request, release) and ``/v1/arbiter`` (state, stats).

``POST /v1/allocations`` body (CONTRACTS.md): ``{"workload_type", "priority", "memory": size,
"min_quality"?: float, "device"?: "gpu:N"}`` (``cuda:N`` is read as ``gpu:N``), plus the
optional extensions ``owner``, ``wait_s`` (wait up to that long for memory instead of failing
at once) and ``preempt``.
No room → 409 ``insufficient_memory`` with ``requested_bytes`` and ``available_bytes``.
Requesting and releasing need the operator role; listing needs viewer.

Allocations owned ``model:NAME`` (the model manager's loads) and ``task:ID`` (running tasks'
reservations) belong to those subsystems: the memory is really in use, so ``DELETE`` refuses
them (409 ``managed_allocation`` naming what to do instead: unload the model, cancel the task),
and a request may not take such an owner name (422).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.deps import Operator, RuntimeDep
from vramancer.api.schemas import AllocationList, AllocationOut, ArbiterOut, Released
from vramancer.arbiter.errors import Preempted
from vramancer.arbiter.types import Allocation, AllocationRequest, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.errors import Conflict, InvalidInput
from vramancer.runtime import Runtime
from vramancer.units import Size

#: Owner prefixes of allocations other subsystems hold, and how a person frees them instead.
MANAGED_OWNERS = {
    "model:": "unload the model: POST /v1/models/{}/unload",
    "task:": "cancel the task: POST /api/tasks/{}/cancel",
}


class ManagedAllocation(Conflict):
    """A model's or a task's allocation cannot be released by hand."""

    code = "managed_allocation"


def _managed(owner: str | None) -> tuple[str, str] | None:
    """(prefix, name) when ``owner`` is a managed owner such as ``model:clip``."""
    for prefix in MANAGED_OWNERS:
        if owner is not None and owner.startswith(prefix):
            return prefix, owner[len(prefix) :]
    return None


router = APIRouter(tags=["allocations"])


class AllocationBody(BaseModel):
    """A request for VRAM."""

    model_config = ConfigDict(extra="forbid")

    workload_type: WorkloadType
    priority: Priority = Priority.NORMAL
    #: Bytes, or a size string such as "4GiB".
    memory: Size = Field(gt=0)
    #: Refuse (409 insufficient_quality) rather than run below this quality.
    min_quality: float | None = Field(default=None, gt=0, le=1)
    #: ``gpu:N`` (VRAMancer's GPU index; ``cuda:N`` means the same GPU); also checked against
    #: that GPU's budget.
    device: str | None = Field(default=None, max_length=32)
    #: Who holds it (shown in listings and ``preempted`` events).
    owner: str | None = Field(default=None, max_length=200)
    #: Wait up to this many seconds (at most 10) for memory to free up (0: answer at once).
    wait_s: float = Field(default=0.0, ge=0, le=10)
    #: May this request take memory from strictly lower priorities?
    preempt: bool = True


def _public(allocation: Allocation, rt: Runtime) -> dict[str, Any]:
    """The allocation, with ``quality_reason``: what its quality target means and why."""
    return {**allocation.as_dict(), "quality_reason": rt.arbiter.quality_reason(allocation)}


@router.get("/v1/allocations", response_model=AllocationList)
async def list_allocations(rt: RuntimeDep) -> dict[str, Any]:
    """Live allocations, oldest first, with the budget they share."""
    state = rt.arbiter.state()
    return {
        "allocations": [_public(a, rt) for a in state.allocations],
        "budget_bytes": state.budget_bytes,
        "allocated_bytes": state.allocated_bytes,
        "available_bytes": state.available_bytes,
    }


@router.post("/v1/allocations", status_code=status.HTTP_201_CREATED, response_model=AllocationOut)
async def request_allocation(
    body: AllocationBody, rt: RuntimeDep, principal: Operator
) -> dict[str, Any]:
    """Grant VRAM now (or within ``wait_s``); 409 with requested/available bytes if no room."""
    if _managed(body.owner) is not None:
        raise InvalidInput(
            f"owner {body.owner!r}: the prefixes {', '.join(MANAGED_OWNERS)} are kept for the "
            "model manager and the task service",
            field="owner",
        )
    request = AllocationRequest(
        workload_type=body.workload_type,
        priority=body.priority,
        memory_bytes=body.memory,
        min_quality=body.min_quality,
        device=DeviceId.parse_input(body.device) if body.device is not None else None,
        preempt=body.preempt,
        owner=body.owner if body.owner is not None else "api",
    )
    if body.wait_s > 0:
        allocation = await rt.arbiter.acquire(request, timeout_s=body.wait_s)
    else:
        allocation = rt.arbiter.allocate(request)
    return _public(allocation, rt)


@router.get("/v1/allocations/{allocation_id}", response_model=AllocationOut)
async def get_allocation(allocation_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """One allocation; 409 ``preempted`` if it was taken, 404 if unknown."""
    return _public(rt.arbiter.get(allocation_id), rt)


@router.delete("/v1/allocations/{allocation_id}", response_model=Released)
async def release_allocation(
    allocation_id: str, rt: RuntimeDep, principal: Operator
) -> dict[str, Any]:
    """Give the memory back; 404 if no such allocation is held, 409 if a model or a running
    task holds it (the memory is in use: unload the model or cancel the task instead)."""
    try:
        owner = rt.arbiter.get(allocation_id).owner
    except Preempted:  # already taken back: releasing it is a no-op, as for its holder
        owner = None
    managed = _managed(owner)
    if managed is not None:
        prefix, name = managed
        what = "model" if prefix == "model:" else "task"
        raise ManagedAllocation(
            f"allocation {allocation_id} is held by {what} {name!r}, which really uses the "
            f"memory; {MANAGED_OWNERS[prefix].format(name)}",
            allocation_id=allocation_id,
            owner=f"{prefix}{name}",
        )
    rt.arbiter.release_allocation(allocation_id)
    return {"released": allocation_id}


@router.get("/v1/arbiter", response_model=ArbiterOut)
async def arbiter_state(rt: RuntimeDep) -> dict[str, Any]:
    """The arbiter's state (budget, pressure, qualities, per-GPU usage) and its counters."""
    return {"state": rt.arbiter.state().as_dict(), "stats": rt.arbiter.stats()}
