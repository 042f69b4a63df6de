"""The release agent over HTTP (see docs/release.md).

* ``GET /v1/release`` (viewer): current, candidate, every release's result, the agent at work
  and this daemon's background prepare (``job``).
* ``GET /v1/release/logs?release=&step=`` (operator): the end of a release's build and test
  logs.
* ``POST /v1/release/prepare`` (operator): starts a prepare in the background (202); its
  progress shows in ``GET /v1/release`` (the release's ``state``: cloning, building, testing,
  then passed or failed). 409 while another prepare or agent is at work.
* ``POST /v1/release/accept``, ``/reject``, ``/rollback`` (admin): the body must say
  ``{"confirm": true}`` (else 400 ``confirmation_required``, nothing changed); ``rollback`` may
  name a ``release``; ``force`` takes a failed release. A refusal is 409 ``release_refused``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from vramancer.api.deps import Admin, Operator, RuntimeDep
from vramancer.errors import Conflict, VramancerError
from vramancer.release.agent import ReleaseAgent
from vramancer.release.layout import describe_holder, read_holder
from vramancer.release.records import RELEASE_NAME
from vramancer.release.steps import ServiceTester
from vramancer.tasks.model import RELEASE_PATTERN

router = APIRouter(prefix="/v1/release", tags=["release"])


class ConfirmationRequired(VramancerError):
    """An action that changes what is deployed was sent without ``"confirm": true``."""

    code = "confirmation_required"
    http_status = 400


class PrepareBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Make the release the candidate even when its build or tests fail.
    force: bool = False


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Must be true: the action changes what is deployed.
    confirm: bool = False
    #: Take a release whose build or tests failed anyway.
    force: bool = False
    #: ``rollback`` only: the release to go back to (default: the one current before).
    release: str | None = Field(default=None, max_length=64, pattern=RELEASE_NAME.pattern)


class StepView(BaseModel):
    exit_code: int | None = None
    duration_s: float = 0.0
    gpu: str | None = None
    task_id: str | None = None
    error: str | None = None


class ReleaseView(BaseModel):
    name: str
    commit: str | None = None
    branch: str | None = None
    repo: str | None = None
    created_at: float | None = None
    state: str | None = None
    build: StepView | None = None
    test: StepView | None = None
    pid: int | None = None
    accepted_at: float | None = None
    forced: bool = False
    error: str | None = None
    stale: bool = False
    path: str


class JobView(BaseModel):
    """This daemon's last background prepare."""

    running: bool
    started_at: float
    finished_at: float | None = None
    release: str | None = None
    error: str | None = None


class ReleaseStatus(BaseModel):
    configured: bool
    repo: str | None
    branch: str
    dir: str
    current: str | None
    candidate: str | None
    #: The agent holding the lock now (pid, action, since), or null.
    busy: dict[str, Any] | None
    releases: list[ReleaseView]
    job: JobView | None = None


class ReleaseOutcome(BaseModel):
    action: str
    release: str | None
    #: What was done, in order ("point current at ...").
    steps: list[str]
    notes: list[str]
    result: ReleaseView | None = None


class PrepareStarted(BaseModel):
    started: bool
    #: Where to follow it.
    status: str


@dataclass
class _Job:
    started_at: float
    agent: ReleaseAgent
    task: asyncio.Task[None] | None = None
    finished_at: float | None = None
    release: str | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        running = self.task is not None and not self.task.done()
        return {
            "running": running,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "release": self.release,
            "error": self.error,
        }


def _agent(rt: Any) -> ReleaseAgent:
    tester = ServiceTester(rt.tasks, asyncio.get_running_loop())
    return ReleaseAgent(rt.settings.release, rt.settings.data_dir, tester=tester)


@router.get("", response_model=ReleaseStatus)
async def get_release(rt: RuntimeDep, request: Request) -> dict[str, Any]:
    """The release directory: links, releases and their results, the agent at work."""
    status = await asyncio.to_thread(_agent(rt).status)
    job: _Job | None = getattr(request.app.state, "release_job", None)
    status["job"] = job.view() if job is not None else None
    return status


class ReleaseLogs(BaseModel):
    #: The release whose logs these are.
    release: str
    build: str | None = None
    test: str | None = None


#: The end of each log a ``GET /v1/release/logs`` answers at most.
LOG_TAIL_BYTES = 1024 * 1024


@router.get("/logs", response_model=ReleaseLogs)
async def get_logs(
    rt: RuntimeDep,
    _: Operator,
    release: Annotated[
        str | None,
        Query(max_length=64, pattern=RELEASE_PATTERN),
    ] = None,
    step: Annotated[Literal["build", "test"] | None, Query()] = None,
) -> dict[str, str]:
    """The end (1 MiB at most) of a release's build and test logs (default: the candidate,
    else the newest). Operator: a build's output may show more than a viewer should see."""
    agent = _agent(rt)
    return await asyncio.to_thread(agent.logs, release, step, max_bytes=LOG_TAIL_BYTES)


@router.post("/prepare", response_model=PrepareStarted, status_code=202)
async def prepare(
    rt: RuntimeDep, request: Request, _: Operator, body: PrepareBody | None = None
) -> dict[str, Any]:
    """Prepare a candidate from the branch's head, in the background."""
    agent = _agent(rt)
    agent.require_repo()  # 409 release_not_configured now rather than in the background
    job: _Job | None = getattr(request.app.state, "release_job", None)
    if job is not None and job.task is not None and not job.task.done():
        raise Conflict("a prepare started by this daemon is still running")
    holder = read_holder(agent.layout.lock_path)
    if holder is not None:
        raise Conflict(f"another release agent is at work: {describe_holder(holder)}")
    force = body.force if body is not None else False
    new = _Job(started_at=time.time(), agent=agent)

    async def run() -> None:
        try:
            outcome = await asyncio.to_thread(agent.prepare, force=force)
            new.release = outcome.release
            if outcome.record is not None and outcome.record.error:
                new.error = outcome.record.error
        except VramancerError as exc:
            new.error = exc.message
        except Exception as exc:  # the job's error is shown in GET /v1/release
            new.error = f"{type(exc).__name__}: {exc}"
        finally:
            new.finished_at = time.time()

    new.task = asyncio.create_task(run(), name="release-prepare")
    request.app.state.release_job = new
    return {"started": True, "status": "/v1/release"}


async def stop_background(app: Any, timeout_s: float = 10.0) -> None:
    """At shutdown: a prepare under way is stopped (its step killed, the release failed)."""
    job: _Job | None = getattr(app.state, "release_job", None)
    if job is None or job.task is None or job.task.done():
        return
    job.agent.stop_event.set()
    await asyncio.wait([job.task], timeout=timeout_s)


async def _act(rt: Any, action: str, body: ActionBody | None) -> dict[str, Any]:
    if body is None or not body.confirm:
        raise ConfirmationRequired(
            f'{action} changes what is deployed: send {{"confirm": true}} to do it',
            field="confirm",
        )
    agent = _agent(rt)
    release = body.release if action == "rollback" else None
    outcome = await asyncio.to_thread(agent.act, action, release, force=body.force)
    return outcome.as_dict()


@router.post("/accept", response_model=ReleaseOutcome)
async def accept(rt: RuntimeDep, _: Admin, body: ActionBody | None = None) -> dict[str, Any]:
    """Make the candidate current (atomically)."""
    return await _act(rt, "accept", body)


@router.post("/reject", response_model=ReleaseOutcome)
async def reject(rt: RuntimeDep, _: Admin, body: ActionBody | None = None) -> dict[str, Any]:
    """Drop the candidate; current stays."""
    return await _act(rt, "reject", body)


@router.post("/rollback", response_model=ReleaseOutcome)
async def rollback(rt: RuntimeDep, _: Admin, body: ActionBody | None = None) -> dict[str, Any]:
    """Point current back at ``release`` (default: the release current before)."""
    return await _act(rt, "rollback", body)
