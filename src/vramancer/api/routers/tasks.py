"""Routes for tasks (``/api/tasks/...``, CONTRACTS.md).

Mounted behind the viewer role. ``cmd``, ``shell`` and ``python`` tasks run code on this
machine, so submitting one needs the operator role (403 for a viewer, nothing queued); the
maintenance kinds (``warmup``, ``compress``, ``noop``) need only the viewer role. Cancelling
needs the operator role. Bad bodies are 422 (unknown type, negative timeout, missing ``cmd``,
a GPU that does not exist), an oversized one 413; in every case nothing is queued.

Tasks belong to the caller that submitted them (``owner_of`` its token): an idempotency key or
task id of another caller's task is refused with 409 (``idempotency_key_taken``,
``task_id_taken``), never answered with that task. A viewer may have at most ``[tasks]
viewer_max_queued`` maintenance tasks not ended (429 ``quota_exceeded``) and a payload of at
most ``viewer_max_payload_bytes`` (422). Status and history show a task's ``env`` in full to
admins, to its owner with secret-looking values (token, secret, password, key ...) hidden, and
to other callers with every value hidden; other callers (not admins) also see its command text
(``cmd``, ``shell``, ``python``), the ``payload`` of a task that runs code and its output tails
as ``<redacted>``. A task's logs (``/{id}/logs``) are readable by its owner and admins only:
another caller gets 403 ``forbidden`` (not 404: status and history already show that the task
exists, so hiding it there would only confuse).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from vramancer.api.deps import Operator, RuntimeDep, Viewer
from vramancer.api.schemas import (
    Submitted,
    SubmittedBatch,
    TaskHistory,
    TaskLogs,
    TaskStats,
    TaskStatus,
)
from vramancer.config import Role
from vramancer.errors import Forbidden
from vramancer.tasks.admission import needs_operator
from vramancer.tasks.logs import MAX_LOG_OFFSET
from vramancer.tasks.model import (
    EnvView,
    SubmitBatch,
    TaskRecord,
    TaskSpec,
    TaskState,
    owner_of,
)

router = APIRouter(prefix="/api/tasks", tags=["tasks"])
#: A task id in a path: as long as a task id may be (``TASK_ID_PATTERN``, generated ids shorter).
TaskIdPath = Annotated[str, Path(min_length=1, max_length=128)]


def _check_role(specs: list[Any], principal: Viewer) -> None:
    if principal.role.allows(Role.OPERATOR):
        return
    first = needs_operator(specs)
    if first is not None:
        i, kind = first
        where = f"tasks[{i}]: " if len(specs) > 1 else ""
        raise Forbidden(
            f"{where}{kind} tasks run code on this machine: they need the operator "
            f"role; the caller has {principal.role.value}"
        )


def _viewer_only(principal: Viewer) -> bool:
    return not principal.role.allows(Role.OPERATOR)


def _env_view(record: TaskRecord, principal: Viewer) -> EnvView:
    if principal.role.allows(Role.ADMIN):
        return EnvView.FULL
    if record.owner == owner_of(principal.token):
        return EnvView.NO_SECRETS
    return EnvView.NAMES


def _shown(record: TaskRecord, principal: Viewer) -> dict[str, Any]:
    return record.as_dict(_env_view(record, principal))


@router.post("/submit", response_model=Submitted)
async def submit(spec: TaskSpec, rt: RuntimeDep, principal: Viewer) -> dict[str, Any]:
    """Queue one task; returns ``{"task_id", "created"}`` once it is durable."""
    _check_role([spec], principal)
    result = await rt.tasks.submit(
        spec, owner=owner_of(principal.token), viewer=_viewer_only(principal)
    )
    return {"task_id": result.task_id, "created": result.created}


@router.post("/submit_batch", response_model=SubmittedBatch)
async def submit_batch(body: SubmitBatch, rt: RuntimeDep, principal: Viewer) -> dict[str, Any]:
    """Queue many tasks in one transaction; any bad task refuses the whole batch. The list's
    length is checked against ``[tasks] max_batch`` before any item is validated."""
    if len(body.tasks) <= rt.settings.tasks.max_batch:
        _check_role(body.tasks, principal)
    results = await rt.tasks.submit_batch(
        body.tasks, owner=owner_of(principal.token), viewer=_viewer_only(principal)
    )
    return {
        "task_ids": [r.task_id for r in results],
        "created": [r.created for r in results],
    }


@router.get("/status", response_model=TaskStatus)
async def status(
    task_id: Annotated[str, Query(min_length=1, max_length=128)],
    rt: RuntimeDep,
    principal: Viewer,
) -> dict[str, Any]:
    """``{"task_id", "state", "attempts", "device", "exit_code", ...}``; 404 if unknown."""
    return _shown(await rt.tasks.status(task_id), principal)


@router.get("/history", response_model=TaskHistory)
async def history(
    rt: RuntimeDep,
    principal: Viewer,
    state: TaskState | None = None,
    since: Annotated[float | None, Query(description="Submitted at or after (epoch s).")] = None,
    cursor: Annotated[str | None, Query(max_length=20, pattern="^[0-9]{1,18}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Tasks newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    page = await rt.tasks.history(state=state, since=since, cursor=cursor, limit=limit)
    return {
        "tasks": [_shown(record, principal) for record in page.tasks],
        "next_cursor": page.next_cursor,
    }


@router.get("/stats", response_model=TaskStats)
async def stats(rt: RuntimeDep) -> dict[str, Any]:
    """Tasks per state, and what maintenance tasks wait for (``maintenance``: ``waiting``,
    ``idle``, ``reason``, ``max_wait_s``, ``auto_maintenance``)."""
    return {"counts": rt.tasks.counts(), "maintenance": rt.tasks.maintenance_window()}


@router.post("/{task_id}/cancel", response_model=TaskStatus)
async def cancel(task_id: TaskIdPath, rt: RuntimeDep, principal: Operator) -> dict[str, Any]:
    """Cancel: at once when waiting; a running task is killed and ends ``cancelled``."""
    return _shown(await rt.tasks.cancel(task_id), principal)


@router.get("/{task_id}/logs", response_model=TaskLogs)
async def logs(
    task_id: TaskIdPath,
    rt: RuntimeDep,
    principal: Viewer,
    max_bytes: Annotated[int | None, Query(ge=1, le=MAX_LOG_OFFSET)] = None,
    stdout_offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET)] = 0,
    stderr_offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET)] = 0,
    attempt: Annotated[int | None, Query(ge=1, description="Default: the latest.")] = None,
) -> dict[str, Any]:
    """stdout and stderr of one attempt (default: the latest; bounded by ``[tasks]
    max_output_bytes``), from byte offsets; ``stdout_next``/``stderr_next`` continue (to follow
    a running task). Only the task's owner and admins may read them (403 for other callers)."""
    admin = principal.role.allows(Role.ADMIN)
    return await rt.tasks.logs(
        task_id,
        max_bytes,
        stdout_offset=stdout_offset,
        stderr_offset=stderr_offset,
        attempt=attempt,
        reader=None if admin else owner_of(principal.token),
    )
