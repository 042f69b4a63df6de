"""Settings of the ``[tasks]`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TasksSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_retries: int = Field(default=2, ge=0, le=100)
    default_timeout_s: float = Field(default=3600, gt=0)
    #: Empty: any command for the operator role; else the executable names allowed.
    allowed_commands: list[str] = Field(default_factory=list)
