"""What a release is: its ``result.json`` (``ReleaseRecord``) and the agent's view of the
release directory (``DeployView``, a frozen snapshot the policy reads)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

#: A release's name: ``<UTC time>-<short sha>`` (``20261207T140000Z-1a2b3c4``).
RELEASE_NAME = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{7,40}$")
#: What a task's ``release`` or ``rollback RELEASE`` may name besides a release.
LINK_NAMES = ("current", "candidate")


class ReleaseState(StrEnum):
    """Where a release is in its life."""

    #: Being cloned.
    CLONING = "cloning"
    #: Its build command runs.
    BUILDING = "building"
    #: Its test command runs.
    TESTING = "testing"
    #: Built and tested: it may become the candidate, then current.
    PASSED = "passed"
    #: Its build or test failed (or the agent stopped in the middle): never accepted without
    #: ``--force``.
    FAILED = "failed"
    #: Was the candidate and was rejected.
    REJECTED = "rejected"

    @property
    def in_progress(self) -> bool:
        return self in (ReleaseState.CLONING, ReleaseState.BUILDING, ReleaseState.TESTING)


@dataclass
class StepResult:
    """One step (build or test): its exit code (None: not run), how long it took, where."""

    exit_code: int | None = None
    duration_s: float = 0.0
    #: The GPU the step ran on (``gpu:0``), for a test run as a VRAMancer task.
    gpu: str | None = None
    #: The task that ran it (a test run as a VRAMancer task).
    task_id: str | None = None
    #: Why it did not run or did not finish (a timeout, a missing command ...).
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class ReleaseRecord:
    """``result.json`` of one release."""

    name: str
    commit: str
    branch: str
    repo: str
    created_at: float
    state: ReleaseState
    build: StepResult = field(default_factory=StepResult)
    test: StepResult = field(default_factory=StepResult)
    #: The process that prepares it (while in progress).
    pid: int | None = None
    #: When it last became ``current`` (None: never).
    accepted_at: float | None = None
    #: It was made the candidate or current with ``--force`` despite a failure.
    forced: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReleaseRecord:
        data = dict(raw)
        data["state"] = ReleaseState(data["state"])
        data["build"] = StepResult(**data.get("build") or {})
        data["test"] = StepResult(**data.get("test") or {})
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ReleaseInfo:
    """A release as the policy sees it."""

    name: str
    state: ReleaseState
    accepted_at: float | None = None
    forced: bool = False
    #: Its preparing process is gone (an in-progress state with no live agent).
    stale: bool = False
    #: The commit it holds.
    commit: str = ""


@dataclass(frozen=True)
class DeployView:
    """The release directory at one moment: releases oldest first, and the two links."""

    releases: tuple[ReleaseInfo, ...]
    current: str | None
    candidate: str | None

    def get(self, name: str) -> ReleaseInfo | None:
        return next((r for r in self.releases if r.name == name), None)
