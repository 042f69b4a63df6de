"""The node registry: pure state and entry building, and the KV mirror on a real server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from tests.natsserver import NatsServer
from tests.unit.pool.conftest import eventually
from vramancer.clock import ManualClock
from vramancer.devices.settings import SimulatedDevice
from vramancer.devices.simulated import SimulatedBackend
from vramancer.devices.types import HostSnapshot, SystemSnapshot
from vramancer.pool.connection import NatsUnavailable, PoolConnection
from vramancer.pool.registry import (
    MAX_ENTRY_BYTES,
    Heartbeat,
    NodeInfo,
    NodeState,
    Registry,
    node_info,
    node_state,
)
from vramancer.pool.settings import NatsSettings
from vramancer.pool.subjects import NODES_BUCKET

GIB = 1024**3
Connect = Callable[..., Any]
HOST = HostSnapshot(
    cpu_count=8,
    cpu_utilization_ratio=0.1,
    memory_total_bytes=64 * GIB,
    memory_available_bytes=32 * GIB,
    memory_used_bytes=32 * GIB,
    swap_total_bytes=0,
    swap_used_bytes=0,
)


def simulated_snapshot() -> SystemSnapshot:
    backend = SimulatedBackend(
        [
            SimulatedDevice(name="sim0", memory=24 * GIB, used=4 * GIB, utilization=0.25),
            SimulatedDevice(name="sim1", memory=12 * GIB),
        ]
    )
    return SystemSnapshot(host=HOST, gpus=(backend.read(0), backend.read(1)))


def entry(name: str, now: float, **changes: Any) -> NodeInfo:
    info = node_info(
        name,
        simulated_snapshot(),
        grantable={"gpu:0": 10 * GIB},
        running_tasks=1,
        now=now,
        started_at=now - 100,
        slots_per_device=2,
        host_slots=4,
        version="0.1.0",
        orchestrator=False,
    )
    return replace(info, **changes)


# -- pure ------------------------------------------------------------------------------------


def test_node_state_boundaries() -> None:
    info = entry("box", 1000.0)
    limits = {"stale_after_s": 15.0, "down_after_s": 60.0}
    assert node_state(info, 1000.0, **limits) is NodeState.UP
    assert node_state(info, 1014.999, **limits) is NodeState.UP
    assert node_state(info, 1015.0, **limits) is NodeState.STALE
    assert node_state(info, 1059.999, **limits) is NodeState.STALE
    assert node_state(info, 1060.0, **limits) is NodeState.DOWN
    assert node_state(info, 990.0, **limits) is NodeState.UP  # a clock a little behind


def test_node_info_from_simulated_gpus() -> None:
    info = entry("gpu-box-1", 1_700_000_000.0)
    assert info.name == "gpu-box-1" and info.last_heartbeat == 1_700_000_000.0
    first, second = info.devices
    assert first.id == "gpu-box-1/gpu:0" and second.id == "gpu-box-1/gpu:1"
    assert first.name == "Simulated GPU sim0" and first.simulated and not first.error
    assert (first.memory_total_bytes, first.memory_used_bytes) == (24 * GIB, 4 * GIB)
    assert first.memory_free_bytes == 20 * GIB and first.utilization_ratio == 0.25
    assert first.grantable_bytes == 10 * GIB
    assert second.grantable_bytes == 0  # not in the mapping: nothing grantable
    assert first.cuda_index is None
    assert NodeInfo.from_json(info.to_json()) == info
    with pytest.raises(ValueError, match="cannot name a node"):
        node_info(
            "bad.name",
            simulated_snapshot(),
            grantable={},
            running_tasks=0,
            now=0,
            started_at=0,
            slots_per_device=1,
            host_slots=1,
            version="x",
            orchestrator=False,
        )


def test_as_dict_has_the_contract_shape() -> None:
    item = entry("box", 1000.0).as_dict(state=NodeState.STALE, now=1020.0)
    assert list(item)[:5] == ["name", "state", "last_heartbeat", "devices", "running_tasks"]
    assert item["state"] == "stale" and item["heartbeat_age_s"] == 20.0
    assert item["running_tasks"] == 1 and item["last_heartbeat"] == 1000.0
    device = item["devices"][0]
    assert list(device)[:5] == [
        "id",
        "name",
        "memory_total_bytes",
        "memory_used_bytes",
        "simulated",
    ]
    assert device["id"] == "box/gpu:0" and device["simulated"] is True
    assert device["grantable_bytes"] == 10 * GIB and device["memory_free_bytes"] == 20 * GIB
    json.dumps(item)


def _json(info: NodeInfo, **changes: Any) -> bytes:
    data = json.loads(info.to_json())
    data.update(changes)
    return json.dumps(data).encode()


def test_malformed_entries_are_refused_naming_the_field() -> None:
    good = entry("box", 1000.0)
    device = json.loads(good.to_json())["devices"][0]
    cases = {
        b"not json": "not JSON",
        b"[1, 2]": "expected an object",
        _json(good, running_tasks=-1): "node.running_tasks",
        _json(good, running_tasks=True): "node.running_tasks",
        _json(good, last_heartbeat="soon"): "node.last_heartbeat",
        _json(good, name="a.b"): "node.name",
        _json(good, devices={}): "node.devices",
        _json(good, devices=[device | {"id": "other/gpu:0"}]): r"node.devices\[0\].id",
        _json(good, devices=[device | {"memory_total_bytes": 1.5}]): "memory_total_bytes",
        _json(good, format=99): "node.format",
        b'{"name": "box"}': "missing",
        b" " * (MAX_ENTRY_BYTES + 1): "bytes",
    }
    for raw, field in cases.items():
        with pytest.raises(ValueError, match=field):
            NodeInfo.from_json(raw)
    # Unknown keys (a newer node's additions) are ignored.
    assert NodeInfo.from_json(_json(good, extra="x")) == good


# -- against a server ----------------------------------------------------------------------


async def _registry(connect: Connect, name: str, clock: ManualClock) -> Registry:
    conn: PoolConnection = await connect(name=name)
    registry = Registry(conn, NatsSettings(), clock)
    await registry.start()
    assert await conn.wait_ready(10)
    return registry


async def test_one_announces_the_other_mirrors(connect: Connect) -> None:
    clock = ManualClock()
    a = await _registry(connect, "a", clock)
    b = await _registry(connect, "b", clock)
    await a.announce(entry("box-a", clock.time()))
    assert a.get("box-a") is not None  # its own write, at once
    await eventually(lambda: b.get("box-a") is not None, what="b sees box-a")
    assert b.nodes() == [entry("box-a", clock.time())]
    assert b.state("box-a") is NodeState.UP and b.state("nobody") is None
    clock.advance(15)
    assert b.state("box-a") is NodeState.STALE
    assert b.report()["nodes"][0]["state"] == "stale"
    await a.announce(entry("box-0", clock.time()))
    await eventually(lambda: len(b.nodes()) == 2, what="b sees box-0")
    assert [n.name for n in b.nodes()] == ["box-0", "box-a"]
    await a.stop()
    await b.stop()


async def test_a_malformed_value_is_skipped(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    writer: PoolConnection = await connect(name="writer")
    assert await writer.wait_ready(10)
    kv = await writer.kv(NODES_BUCKET)
    await kv.put("junk", b"{not json")
    await kv.put("liar", entry("someone-else", clock.time()).to_json())
    await kv.put("fine", entry("fine", clock.time()).to_json())
    with caplog.at_level(logging.WARNING, logger="vramancer.pool.registry"):
        reader = await _registry(connect, "reader", clock)
        assert [n.name for n in reader.nodes()] == ["fine"]
        await kv.put("junk", b"[]")
        await kv.put("late", entry("late", clock.time()).to_json())
        await eventually(lambda: reader.get("late") is not None, what="a later good entry")
    assert reader.get("junk") is None and reader.get("liar") is None
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert any("'junk'" in m for m in skipped) and any("'liar'" in m for m in skipped)
    # A deleted node leaves the mirror.
    await kv.delete("fine")
    await eventually(lambda: reader.get("fine") is None, what="the delete seen")
    await reader.stop()


async def test_the_mirror_answers_while_the_server_is_away(
    nats_server: NatsServer, connect: Connect
) -> None:
    clock = ManualClock()
    a = await _registry(connect, "a", clock)
    b = await _registry(connect, "b", clock)
    await a.announce(entry("box-a", clock.time()))
    await eventually(lambda: b.get("box-a") is not None, what="b sees box-a")

    nats_server.stop()
    await eventually(lambda: not b.connection.connected, what="the loss noticed")
    assert [n.name for n in b.nodes()] == ["box-a"]
    clock.advance(60)
    assert b.state("box-a") is NodeState.DOWN  # still known, aged by the clock
    with pytest.raises(NatsUnavailable):
        await a.announce(entry("box-a", clock.time()))

    nats_server.start()
    assert await b.connection.wait_ready(10) and await a.connection.wait_ready(10)
    await a.announce(entry("box-a", clock.time(), running_tasks=3))
    await eventually(
        lambda: (b.get("box-a") or entry("x", 0)).running_tasks == 3,
        what="the re-created watcher sees a put after the restart",
    )
    assert b.state("box-a") is NodeState.UP
    await a.stop()
    await b.stop()


async def test_heartbeat_rides_out_an_outage_and_logs_it_once(
    nats_server: NatsServer, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    nats_server.stop()
    conn: PoolConnection = await connect(name="beater")
    registry = Registry(conn, NatsSettings(), clock)
    await registry.start()
    beats = 0

    def build() -> NodeInfo:
        nonlocal beats
        beats += 1
        return entry("beater", clock.time(), running_tasks=beats)

    heartbeat = Heartbeat(registry, build, period_s=0.05)
    with caplog.at_level(logging.WARNING, logger="vramancer.pool.registry"):
        await heartbeat.start()
        await eventually(lambda: beats >= 4, what="several tries while the server is down")
    failures = [r for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(failures) == 1 and heartbeat.sent == 0

    nats_server.start()
    await eventually(lambda: heartbeat.sent >= 2, timeout=10, what="heartbeats once it is up")
    kv = await conn.kv(NODES_BUCKET)
    stored = NodeInfo.from_json((await kv.get("beater")).value or b"")
    assert stored.name == "beater" and stored.running_tasks >= 1
    await heartbeat.stop()
    sent = heartbeat.sent
    await asyncio.sleep(0.2)
    assert heartbeat.sent == sent  # the loop is over
    assert (await kv.get("beater")).value  # and the entry is left to age
    await registry.stop()
