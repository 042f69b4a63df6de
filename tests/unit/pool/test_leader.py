"""The dispatch lease on a real server, with a manual clock: one holder at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.natsserver import NatsServer
from tests.unit.pool.conftest import eventually
from vramancer.clock import ManualClock
from vramancer.pool.connection import PoolConnection
from vramancer.pool.leader import DispatchLease, LeaseRecord
from vramancer.pool.subjects import DISPATCH_KEY, POOL_BUCKET

Connect = Callable[..., Any]
TTL = 10.0


async def _leases(
    connect: Connect, clock: ManualClock
) -> tuple[DispatchLease, DispatchLease, PoolConnection]:
    """Two orchestrators' leases, each on its own connection, and the first one's connection."""
    leases, conns = [], []
    for name in ("orch-a", "orch-b"):
        conn: PoolConnection = await connect(name=name)
        assert await conn.wait_ready(10)
        conns.append(conn)
        leases.append(DispatchLease(conn, holder=name, ttl_s=TTL, clock=clock, skew_s=1.0))
    return leases[0], leases[1], conns[0]


async def test_only_one_holds(connect: Connect) -> None:
    clock = ManualClock()
    a, b, conn = await _leases(connect, clock)
    assert await a.tick() and a.held and a.holder() == "orch-a"
    assert not await b.tick() and not b.held and b.holder() == "orch-a"
    clock.advance(5)
    assert await a.tick()  # renewed
    assert not await b.tick()
    kv = await conn.kv(POOL_BUCKET)
    record = LeaseRecord.from_json((await kv.get(DISPATCH_KEY)).value)
    assert record is not None
    assert (record.holder, record.expires_at) == ("orch-a", clock.time() + TTL)


async def test_a_holder_that_stops_renewing_is_taken_over_after_the_ttl(
    connect: Connect,
) -> None:
    clock = ManualClock()
    a, b, _conn = await _leases(connect, clock)
    assert await a.tick()
    clock.advance(TTL - 1.0)
    assert not a.held  # skew_s before the expiry, a stops counting on it
    assert not await b.tick()  # but the record has not expired yet
    clock.advance(1.0)
    assert await b.tick() and b.held and b.holder() == "orch-b"
    assert not await a.tick()  # its compare-and-set fails: b wrote since
    assert not a.held and a.holder() is not None


async def test_a_holder_whose_compare_and_set_fails_reports_not_held(connect: Connect) -> None:
    clock = ManualClock()
    a, _, conn = await _leases(connect, clock)
    assert await a.tick() and a.held
    kv = await conn.kv(POOL_BUCKET)
    await kv.put(DISPATCH_KEY, json.dumps({"holder": "intruder", "expires_at": 0}).encode())
    assert not await a.tick()
    assert not a.held
    # Next tick reads the (expired) record and takes it back with a fresh compare-and-set.
    assert await a.tick() and a.held


async def test_release_lets_the_other_take_it_at_once(connect: Connect) -> None:
    clock = ManualClock()
    a, b, _conn = await _leases(connect, clock)
    assert await a.tick()
    assert not await b.tick()
    await a.release()
    assert not a.held
    assert await b.tick() and b.held  # no clock advance needed
    await a.release()  # not held: nothing deleted
    assert await b.tick() and b.held
    await b.release()
    assert await a.tick()


async def test_a_malformed_record_can_be_taken(connect: Connect) -> None:
    clock = ManualClock()
    a, _, conn = await _leases(connect, clock)
    kv = await conn.kv(POOL_BUCKET)
    await kv.put(DISPATCH_KEY, b"{garbage")
    assert await a.tick() and a.held


async def test_losing_nats_means_not_held(nats_server: NatsServer, connect: Connect) -> None:
    clock = ManualClock()
    a, _, conn = await _leases(connect, clock)
    assert await a.tick()
    nats_server.stop()
    await eventually(lambda: not conn.connected, what="the loss noticed")
    assert not await a.tick() and not a.held
    nats_server.start()
    assert await conn.wait_ready(10)
    # Its own record, written before the outage: taken back at once.
    assert await a.tick() and a.held


async def test_a_second_process_under_the_same_name_waits_for_the_expiry(
    connect: Connect,
) -> None:
    clock = ManualClock()
    a, _, conn = await _leases(connect, clock)
    twin = DispatchLease(conn, holder="orch-a", ttl_s=TTL, clock=clock, skew_s=1.0)
    assert await a.tick()
    assert not await twin.tick() and not twin.held
    clock.advance(TTL)
    assert await twin.tick() and twin.held
    assert not await a.tick() and not a.held
