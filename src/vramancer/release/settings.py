"""``[release]``: the release agent (a git branch -> candidate -> tests -> accept/reject)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vramancer.units import Size


class ReleaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The git repository releases are made from: a URL or a local path. None: no agent.
    repo: str | None = Field(default=None, min_length=1, max_length=4096)
    #: The branch followed.
    branch: str = Field(default="main", min_length=1, max_length=255, pattern=r"^[^\s~^:?*\[\\]+$")
    #: Where releases live (``releases/``, ``current``, ``candidate``); default
    #: ``<data dir>/deploy``.
    dir: Path | None = None
    #: Shell command run in the checkout to build it (none: no build step).
    build: str | None = Field(default=None, min_length=1, max_length=64 * 1024)
    #: Shell command run in the checkout to test it (none: no test step).
    test: str | None = Field(default=None, min_length=1, max_length=64 * 1024)
    #: VRAM the test step needs: it then runs as a VRAMancer task on a GPU (through the daemon).
    vram: Size | None = None
    #: Releases kept (besides ``current`` and ``candidate``, never removed).
    keep: int = Field(default=5, ge=1, le=1000)
    #: Longest a build or test step may run before it is killed (it then fails).
    step_timeout_s: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600.0)
    #: How long a second agent waits for the first one's lock before it gives up.
    lock_timeout_s: float = Field(default=0.0, ge=0, le=24 * 3600.0)
