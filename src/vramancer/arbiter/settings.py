"""Settings of the ``[arbiter]`` section (documented in ``docs/configuration.md``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vramancer.arbiter.types import WorkloadType
from vramancer.units import Size

#: Lowest quality each workload type may be pushed to under pressure (0.4 LLM,
#: 0.3 diffusion). Embedding models are small and lose retrieval quality quickly when
#: squeezed, so they stop at 0.5; "other" is opaque batch GPU work that cannot run at a
#: reduced quality, so it always gets 1.0 (it runs fully or waits).
DEFAULT_MIN_QUALITY: dict[WorkloadType, float] = {
    WorkloadType.LLM: 0.4,
    WorkloadType.IMAGE: 0.3,
    WorkloadType.VIDEO: 0.3,
    WorkloadType.EMBEDDING: 0.5,
    WorkloadType.OTHER: 1.0,
}


class ArbiterSettings(BaseModel):
    """How much VRAM the arbiter hands out, and how quality falls with pressure."""

    model_config = ConfigDict(extra="forbid")

    #: Total budget; None: ``usable_fraction`` of the detected VRAM (sum over GPUs).
    budget: Size | None = None
    #: Share of each GPU's memory the arbiter may hand out (the rest is driver/system overhead).
    usable_fraction: float = Field(default=0.9, gt=0, le=1)
    #: Pressure (allocated / budget) up to which every workload runs at full quality.
    pressure_low: float = Field(default=0.5, ge=0, lt=1)
    #: Per workload type, the lowest quality it is ever given; missing types use the defaults.
    min_quality: dict[WorkloadType, float] = Field(default_factory=dict)
    #: Whether a higher-priority request may take memory from strictly lower-priority holders.
    preemption: bool = True
    #: Default wait of ``acquire`` (model loads, task reservations) before ``ArbiterTimeout``.
    acquire_timeout_s: float = Field(default=30.0, gt=0)
    #: Preempted allocation ids remembered so their holders get ``Preempted``, not "not found".
    preempted_history: int = Field(default=1000, ge=0)

    @field_validator("min_quality")
    @classmethod
    def _check_quality(cls, value: dict[WorkloadType, float]) -> dict[WorkloadType, float]:
        for kind, quality in value.items():
            if not 0.0 < quality <= 1.0:
                raise ValueError(f"min_quality.{kind.value} must be in (0, 1], got {quality!r}")
        return value

    def min_qualities(self) -> dict[WorkloadType, float]:
        """Every workload type's minimum quality: the defaults overlaid with the config."""
        return {**DEFAULT_MIN_QUALITY, **self.min_quality}
