"""Routes for tasks (``/api/tasks/...``, CONTRACTS.md; seed 000's opportunistic scheduler).

Mounted behind the viewer role. ``cmd``, ``shell`` and ``python`` tasks run code on this
machine, so submitting one needs the operator role (403 for a viewer, nothing queued); the
maintenance kinds (``warmup``, ``compress``, ``noop``) need only the viewer role. Cancelling
needs the operator role. Bad bodies are 422 (unknown type, negative timeout, missing ``cmd``,
a GPU that does not exist), an oversized one 413; in every case nothing is queued.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from vramancer.api.deps import Operator, RuntimeDep, Viewer
from vramancer.config import Role
from vramancer.errors import Forbidden
from vramancer.tasks.model import SubmitBatch, TaskSpec, TaskState
from vramancer.tasks.service import MAX_LOG_OFFSET

router = APIRouter(prefix="/api/tasks", tags=["tasks"])


def _check_role(specs: list[TaskSpec], principal: Viewer) -> None:
    if principal.role.allows(Role.OPERATOR):
        return
    for i, spec in enumerate(specs):
        if spec.type.needs_operator:
            where = f"tasks[{i}]: " if len(specs) > 1 else ""
            raise Forbidden(
                f"{where}{spec.type} tasks run code on this machine: they need the operator "
                f"role; the caller has {principal.role.value}"
            )


@router.post("/submit")
async def submit(spec: TaskSpec, rt: RuntimeDep, principal: Viewer) -> dict[str, Any]:
    """Queue one task; returns ``{"task_id", "created"}`` once it is durable."""
    _check_role([spec], principal)
    result = await rt.tasks.submit(spec)
    return {"task_id": result.task_id, "created": result.created}


@router.post("/submit_batch")
async def submit_batch(body: SubmitBatch, rt: RuntimeDep, principal: Viewer) -> dict[str, Any]:
    """Queue many tasks in one transaction; any bad task refuses the whole batch."""
    _check_role(body.tasks, principal)
    results = await rt.tasks.submit_batch(body.tasks)
    return {
        "task_ids": [r.task_id for r in results],
        "created": [r.created for r in results],
    }


@router.get("/status")
async def status(
    task_id: Annotated[str, Query(min_length=1, max_length=128)], rt: RuntimeDep
) -> dict[str, Any]:
    """``{"task_id", "state", "attempts", "device", "exit_code", ...}``; 404 if unknown."""
    return (await rt.tasks.status(task_id)).as_dict()


@router.get("/history")
async def history(
    rt: RuntimeDep,
    state: TaskState | None = None,
    since: Annotated[float | None, Query(description="Submitted at or after (epoch s).")] = None,
    cursor: Annotated[str | None, Query(max_length=20, pattern="^[0-9]{1,18}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Tasks newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    page = await rt.tasks.history(state=state, since=since, cursor=cursor, limit=limit)
    return {
        "tasks": [record.as_dict() for record in page.tasks],
        "next_cursor": page.next_cursor,
    }


@router.get("/stats")
async def stats(rt: RuntimeDep) -> dict[str, Any]:
    """Tasks per state."""
    return {"counts": rt.tasks.counts()}


@router.post("/{task_id}/cancel")
async def cancel(task_id: str, rt: RuntimeDep, _: Operator) -> dict[str, Any]:
    """Cancel: at once when waiting; a running task is killed and ends ``cancelled``."""
    return (await rt.tasks.cancel(task_id)).as_dict()


@router.get("/{task_id}/logs")
async def logs(
    task_id: str,
    rt: RuntimeDep,
    max_bytes: Annotated[int | None, Query(ge=1, le=MAX_LOG_OFFSET)] = None,
    stdout_offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET)] = 0,
    stderr_offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET)] = 0,
    attempt: Annotated[int | None, Query(ge=1, description="Default: the latest.")] = None,
) -> dict[str, Any]:
    """stdout and stderr of one attempt (default: the latest; bounded by ``[tasks]
    max_output_bytes``), from byte offsets; ``stdout_next``/``stderr_next`` continue (to follow
    a running task)."""
    return await rt.tasks.logs(
        task_id,
        max_bytes,
        stdout_offset=stdout_offset,
        stderr_offset=stderr_offset,
        attempt=attempt,
    )
