"""Settings of ``[ollama]``, ``[[models]]``, ``[gpu_manager]`` and ``[profiles.*]``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vramancer.units import Size

Priority = Literal["background", "normal", "high", "user_facing"]


class OllamaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: str = "http://127.0.0.1:11434"


class ModelSpec(BaseModel):
    """One managed model (``[[models]]``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    backend: Literal["ollama", "torch", "process"]
    vram: Size | None = None
    idle_timeout_s: float | None = Field(default=None, gt=0)
    priority: Priority = "normal"
    factory: str | None = None


class GpuManagerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vlm_model: str | None = None
    clip_model: str | None = None
