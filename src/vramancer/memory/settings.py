"""Settings of the ``[memory]`` section (tiered block store).

Every key is documented in ``docs/configuration.md`` (section ``[memory]``). A tier's capacity
left unset is derived from the machine at start: a fraction of the primary GPU's memory (L1),
of the other GPUs' (L2), of the host's available memory (L3, L4), or of the free disk space
where the tier's files live (L5, L6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vramancer.memory.compression import CompressionSettings
from vramancer.memory.regulator import RegulatorSettings
from vramancer.plugins import DOTTED_PATH
from vramancer.units import Size

#: ``package.module:attr`` (the attribute may be dotted).
_DOTTED_PATH = DOTTED_PATH  # package.module:attr


class TierSettings(BaseModel):
    """One tier (``[memory.tiers.L4]``). ``capacity`` None: derived from the machine."""

    model_config = ConfigDict(extra="forbid")

    capacity: Size | None = None
    #: Directory of the tier's files (L5, L6 only); default ``<data_dir>/l5`` / ``<data_dir>/l6``.
    path: Path | None = None
    #: Relative latency (default 1, 1.3, 2.5, 5, 16, 50 for L1..L6).
    latency: float | None = Field(default=None, gt=0)
    #: False: the tier is absent even if the machine has it.
    enabled: bool = True
    #: Per-tier override of ``memory.pressure_high`` / ``memory.pressure_low``.
    pressure_high: float | None = Field(default=None, gt=0, le=1)
    pressure_low: float | None = Field(default=None, ge=0, le=1)


class DeriveSettings(BaseModel):
    """Fractions used to derive a capacity that the configuration leaves unset."""

    model_config = ConfigDict(extra="forbid")

    #: Share of the primary GPU's total memory given to L1.
    gpu_fraction: float = Field(default=0.5, gt=0, le=1)
    #: Share of each other GPU's total memory given to L2.
    other_gpu_fraction: float = Field(default=0.5, gt=0, le=1)
    #: Share of the host's available memory given to pinned L3.
    pinned_fraction: float = Field(default=0.05, gt=0, le=1)
    #: Share of the host's available memory given to pageable L4.
    host_fraction: float = Field(default=0.25, gt=0, le=1)
    #: Share of the free disk space (where L5's files live) given to L5.
    l5_disk_fraction: float = Field(default=0.25, gt=0, le=1)
    #: Share of the free disk space (where L6's files live) given to L6.
    l6_disk_fraction: float = Field(default=0.5, gt=0, le=1)


class MemorySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Half-life of the decayed hit count (hotness), seconds.
    half_life_s: float = Field(default=60.0, gt=0)
    tiers: dict[str, TierSettings] = Field(default_factory=dict)
    derive: DeriveSettings = Field(default_factory=DeriveSettings)
    #: ``[memory.compression]``: codecs and thresholds of the adaptive compression (L5, L6).
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    #: ``[memory.regulator]``: host-memory regulator of the L3/L4 budgets (``regulator.py``).
    regulator: RegulatorSettings = Field(default_factory=RegulatorSettings)
    #: A tier whose used/capacity passes this is under pressure: the eviction cycle runs.
    pressure_high: float = Field(default=0.9, gt=0, le=1)
    #: The eviction cycle demotes blocks until used/capacity is at or under this.
    pressure_low: float = Field(default=0.75, ge=0, le=1)
    #: Seconds between two periodic eviction cycles (the cycle also runs on pressure).
    eviction_interval_s: float = Field(default=5.0, gt=0)
    #: Largest block accepted by ``put`` (the HTTP API also applies ``server.max_body``).
    max_block_size: Size = 256 * 1024 * 1024
    #: Hotness score at or above which a block read from a slower tier is promoted.
    promote_threshold: float = Field(default=1.0, ge=0)
    #: Hotness score at or under which an L4 block counts as cold (``compress_cold``).
    cold_threshold: float = Field(default=0.25, ge=0)
    #: Whether a graceful stop moves L1–L4 blocks to L5/L6 (where room) so a restart keeps them.
    spill_on_stop: bool = True
    #: fsync block files and the metadata database (turn off only for scratch data and tests).
    fsync: bool = True
    #: Whether a put that does not say (``?durable=``, ``put(durable=...)``) is durable: placed
    #: in L5/L6 only, acknowledged once its file, directory and catalog row are fsynced.
    durable_puts: bool = False
    #: Most pending promotions (prefetches) kept; older ones are dropped.
    max_pending_promotions: int = Field(default=1024, ge=1)
    #: ``package.module:attr`` of an ``OrchestratorStrategy`` (``place(block, tiers, now)``)
    #: replacing the default placement (``memory/plugins.py``). None: the default.
    placement_strategy: str | None = Field(default=None, pattern=_DOTTED_PATH)
    #: ``package.module:attr`` of a ``HotnessModel`` (``record_hit``, ``score``) deciding
    #: promotions, warmup, compression and spill. None: the default decayed hit count.
    hotness_model: str | None = Field(default=None, pattern=_DOTTED_PATH)
    #: ``package.module:attr`` of a ``CompressionManager`` for L5/L6 block files. None: the
    #: adaptive compression configured in ``[memory.compression]``.
    compression_manager: str | None = Field(default=None, pattern=_DOTTED_PATH)

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

    @model_validator(mode="after")
    def _check(self) -> MemorySettings:
        known = {"L1", "L2", "L3", "L4", "L5", "L6"}
        for name in self.tiers:
            if name not in known:
                raise ValueError(f"tiers.{name}: unknown tier (expected one of L1..L6)")
        if self.pressure_low > self.pressure_high:
            raise ValueError("pressure_low must not be above pressure_high")
        return self
