"""Settings of the ``[resources]`` section (the can-load and pressure thresholds)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ResourcesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory_threshold: float = Field(default=0.8, gt=0, le=1)
    gpu_memory_threshold: float = Field(default=0.85, gt=0, le=1)
