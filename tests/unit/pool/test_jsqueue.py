"""The JetStream queue as several orchestrators of one pool use it: two ``JetStreamQueue`` on
one real nats-server (each on its own connection) share the tasks; writes race by
compare-and-set; a server restart and an outage are survived. (The behaviour both queues share
is checked on both in ``tests/unit/tasks/test_queue.py``.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.natsserver import NatsServer
from tests.unit.pool.conftest import eventually
from tests.unit.pool.jsqueue_support import NatsDown, Orchestrator, orchestrator
from tests.unit.tasks.queue_support import T0, delay, new
from vramancer.clock import ManualClock
from vramancer.errors import BackendUnavailable
from vramancer.pool import records as rec
from vramancer.pool.connection import NatsUnavailable, PoolConnection
from vramancer.pool.jsqueue import JetStreamQueue
from vramancer.tasks.errors import IdempotencyKeyTaken, PayloadTooLarge, TaskIdTaken
from vramancer.tasks.model import Grant, NewTask, Outcome, OutcomeKind, TaskState


async def sees(queue: JetStreamQueue, task_id: str, state: TaskState | None = None) -> None:
    async def check() -> bool:
        record = await queue.get(task_id)
        return record is not None and (state is None or record.state is state)

    await eventually(check)


def owned(task: NewTask, owner: str) -> NewTask:
    return NewTask(**{**{f: getattr(task, f) for f in task.__slots__}, "owner": owner})


@pytest.fixture
async def pair(nats_server: NatsServer) -> AsyncIterator[tuple[Orchestrator, Orchestrator]]:
    """Two orchestrators of one pool."""
    async with orchestrator(nats_server.url) as a, orchestrator(nats_server.url) as b:
        yield a, b


async def test_a_task_submitted_through_one_orchestrator_is_seen_by_the_other(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    a, b = pair
    results, _ = await a.queue.submit([new("x:1"), new("y")], T0)  # ':' is no KV key character
    assert [r.created for r in results] == [True, True]
    await sees(b.queue, "y")
    await sees(b.queue, "x:1")
    page = await b.queue.history(state=None, since=None, cursor=None, limit=10)
    assert [r.task_id for r in page.tasks] == ["y", "x:1"]
    mine, theirs = await a.queue.get("y"), await b.queue.get("y")
    assert mine == theirs and mine is not None and mine.seq > 0
    assert [r.task_id for r in await b.queue.ready(maintenance=False, limit=5)] == ["x:1", "y"]


async def test_two_orchestrators_leasing_one_task_at_once_give_it_to_one(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    a, b = pair
    await a.queue.submit([new(f"t{i}") for i in range(20)], T0)
    for i in range(20):
        await sees(b.queue, f"t{i}")
    leases = await asyncio.gather(
        *(
            q.lease([Grant(f"t{i}", f"{node}/gpu:0")], worker=node, now=T0, lease_s=30)
            for i in range(20)
            for q, node in ((a.queue, "node-a"), (b.queue, "node-b"))
        )
    )
    winners: dict[str, list[str]] = {}
    for leased, changes in leases:
        assert len(leased) == len(changes)
        for record in leased:
            winners.setdefault(record.task_id, []).append(record.node or "")
    assert sorted(winners) == sorted(f"t{i}" for i in range(20))
    assert all(len(nodes) == 1 for nodes in winners.values())  # never leased twice
    for task_id, (node,) in winners.items():
        await sees(a.queue, task_id, TaskState.SCHEDULED)
        record = await a.queue.get(task_id)
        assert record is not None
        assert (record.attempts, record.lease_token, record.node) == (1, 1, node)
        assert record.device == f"{node}/gpu:0"


async def test_a_late_report_of_a_lost_lease_changes_nothing(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    """A worker cut off from the pool comes back and reports: the new attempt stands."""
    a, b = pair
    await a.queue.submit([new("job")], T0)
    leased, _ = await a.queue.lease([Grant("job", "n1/gpu:0")], worker="n1", now=T0, lease_s=30)
    old = leased[0].lease_token
    await sees(b.queue, "job", TaskState.SCHEDULED)
    changes, _ = await b.queue.expire_leases(T0 + 31)
    assert [(c.previous, c.state) for c in changes] == [(TaskState.SCHEDULED, TaskState.QUEUED)]
    again, _ = await b.queue.lease([Grant("job", "n2/gpu:1")], worker="n2", now=T0 + 32, lease_s=30)
    assert again[0].lease_token == old + 1
    await sees(a.queue, "job", TaskState.SCHEDULED)
    before = await a.queue.bucket.get(rec.task_key("job"))
    late = Outcome("job", old, OutcomeKind.OK, exit_code=0, run_s=5.0)
    assert await a.queue.finish([late], now=T0 + 40, retry_delay=delay) == []
    assert await a.queue.bucket.get(rec.task_key("job")) == before  # nothing written
    assert await a.queue.learned_durations() == {}
    record = await a.queue.get("job")
    assert record is not None
    assert (record.state, record.node, record.attempts) == (TaskState.SCHEDULED, "n2", 2)
    current = Outcome("job", again[0].lease_token, OutcomeKind.OK, exit_code=0, run_s=5.0)
    done = await a.queue.finish([current], now=T0 + 41, retry_delay=delay)
    assert [(c.state, c.device) for c in done] == [(TaskState.DONE, "n2/gpu:1")]
    await eventually(lambda: _durations(b.queue))


async def _durations(queue: JetStreamQueue) -> bool:
    return await queue.learned_durations() == {"cmd:true": 5.0}


async def test_the_same_submission_twice_is_one_task(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    a, b = pair
    # The same idempotency key through both orchestrators at the same instant.
    (ra, ca), (rb, cb) = await asyncio.gather(
        a.queue.submit([new("from-a", key="k1")], T0), b.queue.submit([new("from-b", key="k1")], T0)
    )
    assert ra[0].task_id == rb[0].task_id
    assert sorted([ra[0].created, rb[0].created]) == [False, True]
    assert len(ca) + len(cb) == 1
    # The same task id at the same instant.
    (ra, _), (rb, _) = await asyncio.gather(
        a.queue.submit([new("given")], T0), b.queue.submit([new("given")], T0)
    )
    assert sorted([ra[0].created, rb[0].created]) == [False, True]
    # A create repeated after a lost acknowledgement (same Nats-Msg-Id): written once.
    key = rec.task_key("given")
    value = await a.queue.bucket.get(key)
    assert value is not None and value.data is not None
    assert await a.queue.bucket.create(key, value.data, key) is None
    assert await a.queue.bucket.get(key) == value
    await sees(b.queue, ra[0].task_id)
    counts = await b.queue.counts()
    assert counts == {(False, TaskState.QUEUED): 2}


async def test_another_owners_key_or_id_refuses_the_whole_submission(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    a, b = pair
    await a.queue.submit([owned(new("alice-1", key="shared"), "alice")], T0)
    await a.queue.submit([owned(new("alice-2"), "alice")], T0)
    # b has not seen them yet or has: either way the write itself finds them taken.
    with pytest.raises(IdempotencyKeyTaken):
        await b.queue.submit(
            [owned(new("bob-1"), "bob"), owned(new("bob-2", key="shared"), "bob")], T0
        )
    with pytest.raises(TaskIdTaken):
        await b.queue.submit(
            [owned(new("bob-3", key="bob-key"), "bob"), owned(new("alice-2"), "bob")], T0
        )
    await sees(b.queue, "alice-2")
    for task_id in ("bob-1", "bob-2", "bob-3"):
        assert await b.queue.get(task_id) is None
        assert await a.queue.bucket.get(rec.task_key(task_id)) in (None, _deleted())
    # Nothing of the refused submissions is left: bob may use his key now.
    results, _ = await b.queue.submit([owned(new("bob-4", key="bob-key"), "bob")], T0)
    assert [(r.task_id, r.created) for r in results] == [("bob-4", True)]


def _deleted() -> object:
    class AnyDeleted:
        def __eq__(self, other: object) -> bool:
            return getattr(other, "data", 1) is None

    return AnyDeleted()


async def test_a_key_whose_task_was_never_written_gets_it_written(
    nats_server: NatsServer,
) -> None:
    """An orchestrator that died between the key and the task: the repeat writes the task."""
    async with orchestrator(nats_server.url) as a:
        name = rec.idempotency_key("half")
        owner = rec.KeyOwner("first-id", "local")
        assert await a.queue.bucket.create(name, rec.encode_key_owner(owner), name) is not None
        results, changes = await a.queue.submit([new("second-id", key="half")], T0)
        assert [(r.task_id, r.created) for r in results] == [("first-id", True)]
        record = await a.queue.get("first-id")
        assert record is not None and record.spec["task_id"] == "first-id"
        assert [c.task_id for c in changes] == ["first-id"]


async def test_purged_tasks_free_their_key_and_id(nats_server: NatsServer) -> None:
    async with orchestrator(nats_server.url) as a:
        await a.queue.submit([new("old", key="nightly"), new("newest")], T0)
        leased, _ = await a.queue.lease([Grant("old", "gpu:0")], worker="w", now=T0, lease_s=30)
        ok = Outcome("old", leased[0].lease_token, OutcomeKind.OK)
        await a.queue.finish([ok], now=T0 + 1, retry_delay=delay)
        purged = await a.queue.purge(ended_before=T0 + 10, limit=10)
        assert [(p.task_id, p.state) for p in purged] == [("old", TaskState.DONE)]
        results, _ = await a.queue.submit([new("old", key="nightly")], T0 + 20)
        assert [(r.task_id, r.created) for r in results] == [("old", True)]
        record = await a.queue.get("old")
        assert record is not None and record.state is TaskState.QUEUED and record.attempts == 0


async def test_delete_markers_leave_the_stream_once_old(nats_server: NatsServer) -> None:
    """A purged task's key leaves a delete marker that every new copy would load again: the
    markers go once every watcher has long delivered them."""
    clock = ManualClock()
    async with orchestrator(nats_server.url, clock_time=clock.monotonic, marker_keep_s=60) as a:
        await a.queue.submit([new("old", key="nightly"), new("newest")], T0)
        leased, _ = await a.queue.lease([Grant("old", "gpu:0")], worker="w", now=T0, lease_s=30)
        ok = Outcome("old", leased[0].lease_token, OutcomeKind.OK)
        await a.queue.finish([ok], now=T0 + 1, retry_delay=delay)
        assert [p.task_id for p in await a.queue.purge(ended_before=T0 + 10, limit=10)] == ["old"]
        keys = {rec.task_key("old"), rec.idempotency_key("nightly")}
        await eventually(lambda: _markers(a.queue, keys))
        assert await a.queue.purge(ended_before=T0 + 10, limit=10) == []
        marker = await a.queue.bucket.get(rec.task_key("old"))
        assert marker is not None and marker.data is None  # still there: seen just now
        clock.advance(61)
        await a.queue.purge(ended_before=T0 + 10, limit=10)
        for key in keys:
            assert await a.queue.bucket.get(key) is None  # no message of the key is left
        assert await a.queue.bucket.get(rec.task_key("newest")) is not None
        results, _ = await a.queue.submit([new("old", key="nightly")], T0 + 20)
        assert [(r.task_id, r.created) for r in results] == [("old", True)]


async def _markers(queue: JetStreamQueue, keys: set[str]) -> bool:
    return keys <= set(queue.store.mirror.markers)


async def test_a_record_over_the_buckets_value_size_is_refused(nats_server: NatsServer) -> None:
    async with orchestrator(nats_server.url, bucket="small", max_value=2048) as a:
        big = new("big")
        big = NewTask(**{**{f: getattr(big, f) for f in big.__slots__}, "spec_json": "x" * 4000})
        with pytest.raises(PayloadTooLarge) as refused:
            await a.queue.submit([new("fine"), big], T0)
        assert refused.value.details["field"] == "spec"
        assert await a.queue.get("fine") is None  # refused before anything was written


async def test_the_queue_keeps_working_after_the_server_restarts(
    nats_server: NatsServer, pair: tuple[Orchestrator, Orchestrator]
) -> None:
    a, b = pair
    await a.queue.submit([new("before")], T0)
    await sees(b.queue, "before")
    nats_server.restart()
    for o in (a, b):
        await eventually(lambda o=o: _connected(o))
        await o.queue.resync(retry_s=30)
    await b.queue.submit([new("after")], T0 + 1)
    await sees(a.queue, "after")
    leased, _ = await a.queue.lease([Grant("after", "gpu:0")], worker="w", now=T0, lease_s=30)
    assert [r.task_id for r in leased] == ["after"]
    await sees(b.queue, "after", TaskState.SCHEDULED)
    assert {r.task_id for r in await b.queue.ready(maintenance=False, limit=5)} == {"before"}


async def _connected(o: Orchestrator) -> bool:
    return o.link.nc is not None and o.link.nc.is_connected


async def test_while_the_server_is_down_reads_answer_and_writes_refuse(
    nats_server: NatsServer, pair: tuple[Orchestrator, Orchestrator]
) -> None:
    a, _ = pair
    await a.queue.submit([new("known")], T0)
    nats_server.stop()
    await eventually(lambda: _disconnected(a))
    with pytest.raises(BackendUnavailable) as refused:
        await a.queue.submit([new("lost")], T0)
    assert isinstance(refused.value, NatsDown)
    with pytest.raises(BackendUnavailable):
        await a.queue.cancel("known", T0)
    record = await a.queue.get("known")
    assert record is not None and record.state is TaskState.QUEUED
    page = await a.queue.history(state=None, since=None, cursor=None, limit=5)
    assert [r.task_id for r in page.tasks] == ["known"]
    assert [r.task_id for r in await a.queue.ready(maintenance=False, limit=5)] == ["known"]
    nats_server.start()
    await eventually(lambda: _connected(a))
    await a.queue.resync(retry_s=30)
    assert await a.queue.get("lost") is None
    record = await a.queue.get("known")
    assert record is not None and record.state is TaskState.QUEUED  # the cancel wrote nothing


async def _disconnected(o: Orchestrator) -> bool:
    return o.link.nc is not None and not o.link.nc.is_connected


async def test_on_the_pools_connection_the_queue_follows_restarts_and_outages(
    nats_server: NatsServer, connect: Callable[..., Awaitable[PoolConnection]]
) -> None:
    """The owner's way: ``js`` from ``PoolConnection``, ``resync`` as an on-connect callback."""
    conns = [await connect(name="o1"), await connect(name="o2")]
    a, b = (JetStreamQueue(lambda c=c: c.js, clock_time=time.monotonic) for c in conns)
    for conn, queue in zip(conns, (a, b), strict=True):
        conn.on_connect(queue.resync)
        assert await conn.wait_ready(10)
    try:
        await a.submit([new("one")], T0)
        await sees(b, "one")
        loaded = a.synced_at
        assert loaded is not None
        nats_server.stop()
        await eventually(lambda: _down(conns[0]))
        with pytest.raises(NatsUnavailable):
            await a.submit([new("lost")], T0)
        assert (await a.get("one")) is not None  # reads answer from the copy
        nats_server.start()

        async def submitted() -> bool:
            try:
                await b.submit([new("two")], T0 + 1)
            except BackendUnavailable:
                return False
            return True

        await eventually(submitted, timeout=20)
        await sees(a, "two")
        assert (a.synced_at or 0) > loaded  # reloaded by the on-connect callback
        assert await a.get("lost") is None
    finally:
        await a.close()
        await b.close()


async def _down(conn: PoolConnection) -> bool:
    return not conn.connected
