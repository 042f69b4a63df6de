"""Settings of the ``[ha]`` section (and the top-level ``ha_*`` keys kept for ``VRM_HA_*``).

Every key is documented in ``docs/configuration.md`` (section ``## [ha]``) and ``docs/ha.md``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

#: Shortest ``VRM_HA_SECRET`` accepted (bytes).
MIN_SECRET_BYTES = 32


class HaRole(StrEnum):
    """The role a node starts in (``VRM_HA_ROLE``)."""

    PRIMARY = "primary"
    STANDBY = "standby"


class HaSettings(BaseModel):
    """``[ha]``: what replication ships besides state, and how long sync mode waits."""

    model_config = ConfigDict(extra="forbid")

    #: Also ship the bytes of blocks on disk tiers (L5, L6); RAM-tier bytes never are.
    replicate_data: bool = False
    #: In sync mode, a write that no peer confirms within this many seconds is refused (503).
    sync_timeout_s: float = Field(default=5.0, gt=0, le=300)
    #: Deltas per ``POST /v1/ha/deltas`` batch.
    batch_max: int = Field(default=500, ge=1, le=10_000)
    #: Seconds between two shipping rounds to a peer that is up to date (a wake-up comes sooner).
    ship_interval_s: float = Field(default=0.2, gt=0, le=60)
    #: Seconds one shipping request may take.
    peer_timeout_s: float = Field(default=5.0, gt=0, le=300)
