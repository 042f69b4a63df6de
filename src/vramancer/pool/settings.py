"""Settings of the ``[nats]`` section: how a node reaches the pool's NATS servers.

Every key is documented in ``docs/configuration.md`` (section ``## [nats]``) and ``docs/pool.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vramancer.devices.ids import node_name_problem

__all__ = ["NatsSettings", "default_node_name", "node_name_problem"]


def default_node_name(hostname: str) -> str:
    """A node name from a host name: its first label, other characters turned into ``-``."""
    first = hostname.split(".", 1)[0] or "node"
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", first)[:63]
    return cleaned if node_name_problem(cleaned) is None else "node-" + cleaned.strip("-_")[:58]


class NatsSettings(BaseModel):
    """``[nats]``: unset ``url`` (the default) keeps VRAMancer on one machine."""

    model_config = ConfigDict(extra="forbid")

    #: ``nats://host:4222``; several servers comma-separated; ``user:password@`` allowed.
    url: str | None = Field(default=None, max_length=4096)
    #: Token authentication (instead of a user and password in the URL).
    token: str | None = Field(default=None, max_length=4096)
    #: A ``.creds`` file (JWT and nkey seed), as ``nsc`` writes them.
    creds: Path | None = None
    #: A file holding an nkey seed (``SU...``).
    nkey_seed: Path | None = None
    #: TLS: the CA that signed the servers' certificates, and this node's certificate and key.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Seconds one connection attempt may take.
    connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    #: Seconds between two attempts while the servers cannot be reached (start-up included).
    reconnect_wait_s: float = Field(default=1.0, gt=0, le=60)
    #: Seconds between two heartbeats of a node in the registry.
    heartbeat_s: float = Field(default=5.0, gt=0, le=60)
    #: A node without a heartbeat for this long is ``stale``: it gets no new work.
    stale_after_s: float = Field(default=15.0, gt=0, le=3600)
    #: A node without a heartbeat for this long is ``down``.
    down_after_s: float = Field(default=60.0, gt=0, le=86400)
    #: Seconds an orchestrator holds the dispatch lease without renewing it.
    leader_lease_s: float = Field(default=10.0, gt=0, le=600)
    #: Deliveries of one dispatch message before it goes to the dead-letter subject.
    max_deliver: int = Field(default=5, ge=1, le=1000)
    #: Replicas of the pool's streams and buckets (1 on a single server; 3 on a cluster).
    replicas: int = Field(default=1, ge=1, le=5)
    #: Prefix of this node's reply subjects (``_INBOX``); give each NATS user its own (e.g.
    #: ``_INBOX_box3090``) and allow it only that, so no user reads another's replies.
    inbox_prefix: str = Field(default="_INBOX", pattern=r"^[A-Za-z0-9_-]{1,64}$")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for part in value.split(","):
            scheme = part.strip().split("://", 1)[0] if "://" in part else ""
            if scheme not in ("nats", "tls", "ws", "wss"):
                raise ValueError(
                    f"{part.strip()!r} is not a NATS server address (nats://host:4222)"
                )
        return value.strip()

    @property
    def servers(self) -> list[str]:
        return [p.strip() for p in (self.url or "").split(",") if p.strip()]

    @property
    def enabled(self) -> bool:
        return self.url is not None
