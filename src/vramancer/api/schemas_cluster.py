"""Response models of the pool, fastpath, gateway-queue and HA routes (``api/schemas.py``'s
rules: fields are added, never renamed; undeclared keys pass through)."""

from __future__ import annotations

from typing import Literal

from vramancer.api.schemas import Answer

# -- cluster --------------------------------------------------------------------------------------


class ClusterDevice(Answer):
    """A GPU of a node: ``NODE/gpu:N``."""

    id: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    simulated: bool


class ClusterNode(Answer):
    """One node of ``GET /v1/cluster/nodes``."""

    name: str
    state: Literal["up", "stale", "down"]
    #: Unix seconds.
    last_heartbeat: float
    devices: list[ClusterDevice]
    running_tasks: int


class ClusterNodes(Answer):
    """``GET /v1/cluster/nodes``."""

    nodes: list[ClusterNode]


class FastpathLink(Answer):
    peer: str
    interface: str
    latency_s: float | None
    bandwidth_bytes_per_s: float | None
    measured_at: float
    error: str | None
    best: bool


class FastpathReport(Answer):
    """``GET /v1/fastpath``."""

    enabled: bool
    address: str | None
    interfaces: list[str]
    peers: list[str]
    links: list[FastpathLink]


class GatewayModelQueue(Answer):
    model: str
    queued: int
    in_flight: int
    oldest_wait_s: float | None


class GatewayQueues(Answer):
    """``GET /v1/gateway``."""

    models: list[GatewayModelQueue]


class HaPeer(Answer):
    """One peer as the primary sees it: its acknowledged seq, its lag in deltas, and whether
    it is ``up`` (caught up), ``behind`` (catching up or getting a snapshot) or ``down``."""

    address: str
    acked_seq: int
    lag: int
    state: str


class HaStatus(Answer):
    """``GET /v1/ha/status``: replication on this node (``enabled`` false: the rest is empty)."""

    enabled: bool
    role: str | None
    epoch: int
    last_seq: int
    journal_bytes: int
    peers: list[HaPeer]


class HaAck(Answer):
    """``POST /v1/ha/deltas``: where the receiver stands after the batch."""

    acked_seq: int
    epoch: int
    role: str
