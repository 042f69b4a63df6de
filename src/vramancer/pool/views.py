"""What the dispatcher sees of the pool, as pure functions of the registry and the leases.

``pool_views``: one ``DeviceView`` per GPU of every ``up`` node (``NODE/gpu:N``), built from
the node's last heartbeat (driver-free memory, what its arbiter can still grant, utilization,
temperature) less the VRAM of tasks leased to it since that heartbeat (the node has not
reported them yet), with the slots its leased tasks take. A ``stale`` or ``down`` node gets no
new work. ``pool_gpus``: the GPUs of the ``up`` nodes, for admission.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vramancer.pool.registry import NodeInfo, NodeState, node_state
from vramancer.tasks.model import LEASED_STATES, TaskRecord
from vramancer.tasks.picker import DeviceView


@dataclass(frozen=True, slots=True)
class Leased:
    """Tasks leased to one device: how many, and the VRAM of those its node has not reported."""

    running: int = 0
    unseen_bytes: int = 0
    reserved_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PoolGpu:
    """A GPU of a live node, as admission sees it (``tasks.ports.PoolGpu``)."""

    node: str
    index: int
    grantable_total_bytes: int


def leased_by_device(
    records: Iterable[TaskRecord], heartbeats: dict[str, float]
) -> dict[str, Leased]:
    """Per device (``NODE/gpu:N``), the tasks leased there; a task leased after its node's last
    heartbeat counts as unseen."""
    out: dict[str, Leased] = {}
    for record in records:
        if record.state not in LEASED_STATES or record.device is None:
            continue
        seen = heartbeats.get(record.node or "", 0.0)
        unseen = record.vram_bytes if (record.scheduled_at or 0.0) >= seen else 0
        prior = out.get(record.device, Leased())
        out[record.device] = Leased(
            prior.running + 1,
            prior.unseen_bytes + unseen,
            prior.reserved_bytes + record.vram_bytes,
        )
    return out


def live_nodes(
    nodes: Sequence[NodeInfo], now: float, *, stale_after_s: float, down_after_s: float
) -> list[NodeInfo]:
    return [
        node
        for node in nodes
        if node_state(node, now, stale_after_s=stale_after_s, down_after_s=down_after_s)
        is NodeState.UP
    ]


def pool_views(
    nodes: Sequence[NodeInfo],
    leased: Sequence[TaskRecord],
    now: float,
    *,
    stale_after_s: float,
    down_after_s: float,
) -> list[DeviceView]:
    """The picker's views of every GPU of the ``up`` nodes (see the module docstring)."""
    live = live_nodes(nodes, now, stale_after_s=stale_after_s, down_after_s=down_after_s)
    loads = leased_by_device(leased, {n.name: n.last_heartbeat for n in live})
    views = []
    for node in live:
        age = max(0.0, now - node.last_heartbeat)
        for dev in node.devices:
            load = loads.get(dev.id, Leased())
            views.append(
                DeviceView(
                    device=dev.id,
                    index=dev.index,
                    total_bytes=dev.memory_total_bytes,
                    free_bytes=dev.memory_free_bytes,
                    grantable_bytes=max(0, dev.grantable_bytes - load.unseen_bytes),
                    unseen_bytes=load.unseen_bytes,
                    utilization_ratio=dev.utilization_ratio,
                    temperature_celsius=dev.temperature_celsius,
                    age_s=age,
                    error=dev.error,
                    running=load.running,
                    slots=node.slots_per_device,
                    cuda_index=dev.cuda_index,
                    own_bytes=load.reserved_bytes,
                    node=node.name,
                )
            )
    return views


def pool_gpus(
    nodes: Sequence[NodeInfo], now: float, *, stale_after_s: float, down_after_s: float
) -> list[PoolGpu]:
    """The GPUs of the ``up`` nodes: a task must fit one of them to be queued."""
    live = live_nodes(nodes, now, stale_after_s=stale_after_s, down_after_s=down_after_s)
    return [
        PoolGpu(node.name, dev.index, dev.memory_total_bytes)
        for node in live
        for dev in node.devices
    ]


def node_problem(
    nodes: Sequence[NodeInfo],
    name: str,
    now: float,
    *,
    stale_after_s: float,
    down_after_s: float,
) -> str | None:
    """Why a task cannot be pinned to ``name`` now: unknown or down (a stale node may come
    back: its tasks wait)."""
    found = next((n for n in nodes if n.name == name), None)
    if found is None:
        known = ", ".join(sorted(n.name for n in nodes)) or "none"
        return f"no node {name!r} in the pool (nodes: {known})"
    state = node_state(found, now, stale_after_s=stale_after_s, down_after_s=down_after_s)
    if state is NodeState.DOWN:
        return f"node {name!r} is down (no heartbeat for {now - found.last_heartbeat:.0f} s)"
    return None
