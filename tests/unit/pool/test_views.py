"""What the dispatcher sees of the pool (``pool/views.py``): pure, exact numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.tasks.records import make_record
from vramancer.pool.messages import BadMessage, Dispatch, LogsRequest
from vramancer.pool.registry import NodeDevice, NodeInfo
from vramancer.pool.views import node_problem, pool_gpus, pool_views
from vramancer.tasks.model import TaskState

GIB = 1024**3
TIMERS = {"stale_after_s": 15.0, "down_after_s": 60.0}


def device(
    node: str, index: int, *, total: int = 24, free: int = 24, grant: int = 20
) -> NodeDevice:
    return NodeDevice(
        id=f"{node}/gpu:{index}",
        index=index,
        name="sim",
        memory_total_bytes=total * GIB,
        memory_used_bytes=(total - free) * GIB,
        memory_free_bytes=free * GIB,
        grantable_bytes=grant * GIB,
        utilization_ratio=0.1,
        temperature_celsius=50.0,
        simulated=True,
        cuda_index=None,
        error=False,
    )


def node(name: str, heartbeat: float, *devices: NodeDevice, slots: int = 2) -> NodeInfo:
    return NodeInfo(
        name=name,
        devices=devices,
        running_tasks=0,
        last_heartbeat=heartbeat,
        started_at=0.0,
        slots_per_device=slots,
        host_slots=2,
        version="test",
        orchestrator=False,
    )


def leased(
    task_id: str, device_id: str, node_name: str, vram_gib: int, at: float, state: TaskState
):
    return replace(
        make_record(task_id=task_id, state=state),
        device=device_id,
        node=node_name,
        vram_bytes=vram_gib * GIB,
        scheduled_at=at,
    )


def test_views_count_leases_and_what_the_node_has_not_reported() -> None:
    nodes = [
        node("a", 100.0, device("a", 0), device("a", 1, free=10)),
        node("b", 90.0, device("b", 0)),  # 20 s silent at now=110: stale, no new work
        node("c", 40.0, device("c", 0)),  # down
    ]
    tasks = [
        leased("t1", "a/gpu:0", "a", 4, at=99.0, state=TaskState.RUNNING),  # reported
        leased("t2", "a/gpu:0", "a", 6, at=101.0, state=TaskState.SCHEDULED),  # not yet
        leased("t3", "b/gpu:0", "b", 1, at=95.0, state=TaskState.RUNNING),
    ]
    views = pool_views(nodes, tasks, 110.0, **TIMERS)
    assert [v.device for v in views] == ["a/gpu:0", "a/gpu:1"]
    a0, a1 = views
    assert (a0.running, a0.slots, a0.node, a0.age_s) == (2, 2, "a", 10.0)
    assert (a0.unseen_bytes, a0.own_bytes) == (6 * GIB, 10 * GIB)
    assert a0.grantable_bytes == 14 * GIB  # 20 granted by the node's arbiter, 6 not yet seen
    assert a0.available_bytes == 14 * GIB  # min(24 free - 6 unseen, 14)
    assert (a1.running, a1.available_bytes) == (0, 10 * GIB)


def test_gpus_and_node_problems_for_admission() -> None:
    nodes = [node("a", 100.0, device("a", 0, total=24)), node("c", 40.0, device("c", 0, total=80))]
    gpus = pool_gpus(nodes, 110.0, **TIMERS)
    assert [(g.node, g.index, g.grantable_total_bytes) for g in gpus] == [("a", 0, 24 * GIB)]
    assert node_problem(nodes, "a", 110.0, **TIMERS) is None
    assert node_problem(nodes, "c", 110.0, **TIMERS) == "node 'c' is down (no heartbeat for 70 s)"
    assert node_problem(nodes, "x", 110.0, **TIMERS) == "no node 'x' in the pool (nodes: a, c)"


def test_messages_round_trip_and_poison_is_named() -> None:
    msg = Dispatch("t1", 3, "a/gpu:0")
    assert Dispatch.decode(msg.encode()) == msg and msg.msg_id == "t1.3"
    request = LogsRequest("t1", max_bytes=10, stdout_offset=5, attempt=2)
    assert LogsRequest.decode(request.encode()) == request
    for data, why in (
        (b"{", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"task_id":"t","lease_token":-1,"device":"a/gpu:0"}', "lease_token"),
        (b'{"task_id":"","lease_token":1,"device":"a/gpu:0"}', "task_id"),
        (b"x" * 70_000, "at most"),
    ):
        with pytest.raises(BadMessage, match=why):
            Dispatch.decode(data)
