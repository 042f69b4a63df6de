"""Settings of the ``[arbiter]`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramancer.units import Size


class ArbiterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Total budget; None: 90 % of the detected VRAM.
    budget: Size | None = None
    usable_fraction: float = Field(default=0.9, gt=0, le=1)
