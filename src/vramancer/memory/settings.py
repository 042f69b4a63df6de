"""Settings of the ``[memory]`` section (tiered block store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vramancer.units import Size


class TierSettings(BaseModel):
    """One tier (``[memory.tiers.L4]``). ``capacity`` None: derived from the machine."""

    model_config = ConfigDict(extra="forbid")

    capacity: Size | None = None
    path: Path | None = None
    latency: float | None = Field(default=None, gt=0)
    enabled: bool = True


class MemorySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    half_life_s: float = Field(default=60.0, gt=0)
    tiers: dict[str, TierSettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _upper_tier_names(cls, data: Any) -> Any:
        """Tier names are case-insensitive (env vars arrive lower-cased); later keys win."""
        if isinstance(data, dict) and isinstance(data.get("tiers"), dict):
            merged: dict[str, Any] = {}
            for name, value in data["tiers"].items():
                key = str(name).upper()
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            data = {**data, "tiers": merged}
        return data
