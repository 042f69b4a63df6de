"""Two orchestrators racing over the same tasks (lease, report, take back, requeue), then the
invariants of the queue: no task ends twice, every report that counted held the lease,
lease tokens only grow, and both copies end equal to the bucket."""

from __future__ import annotations

import asyncio
import random

from tests.natsserver import NatsServer
from tests.unit.pool.conftest import eventually
from tests.unit.pool.jsqueue_support import orchestrator
from tests.unit.tasks.queue_support import T0, delay, new
from vramancer.pool.jsqueue import JetStreamQueue
from vramancer.tasks.model import Change, Grant, Outcome, OutcomeKind, TaskRecord, TaskState

TASKS = 40


async def _round(q: JetStreamQueue, name: str, rng: random.Random, now: float) -> list[Change]:
    """What a busy orchestrator does in one round, on what its copy shows."""
    changes: list[Change] = []
    ready = await q.ready(maintenance=False, limit=6)
    picked = rng.sample(ready, min(3, len(ready)))  # the two often pick the same task
    grants = [Grant(r.task_id, f"{name}/gpu:0", previous=r.state) for r in picked]
    leased, got = await q.lease(grants, worker=name, now=now, lease_s=5)
    changes += got
    page = await q.history(state=TaskState.SCHEDULED, since=None, cursor=None, limit=20)
    reports = [_report(r, rng) for r in [*leased, *page.tasks]]
    changes += await q.finish(reports, now=now, retry_delay=delay)
    expired, _ = await q.expire_leases(now, max_lease_losses=50)
    changes += expired
    changes += await q.promote_due(now + 1000)
    return changes


async def _loaded(q: JetStreamQueue) -> bool:
    return sum((await q.counts()).values()) == TASKS


def _report(r: TaskRecord, rng: random.Random) -> Outcome:
    token = r.lease_token - (1 if rng.random() < 0.2 else 0)  # some reports come late
    kind = OutcomeKind.OK if rng.random() < 0.5 else OutcomeKind.RELEASED
    return Outcome(r.task_id, token, kind, exit_code=0)


async def test_racing_orchestrators_keep_the_queue_consistent(nats_server: NatsServer) -> None:
    rng = random.Random(7)
    async with orchestrator(nats_server.url) as a, orchestrator(nats_server.url) as b:
        await a.queue.submit([new(f"t{i}", max_retries=50) for i in range(TASKS)], T0)
        await eventually(lambda: _loaded(b.queue))
        seen: list[Change] = []
        for step in range(40):
            now = T0 + step * 3
            done = await asyncio.gather(
                _round(a.queue, "na", rng, now), _round(b.queue, "nb", rng, now)
            )
            seen += done[0] + done[1]
            await asyncio.sleep(0.01)  # the watchers bring each copy the other's writes
        ended = [c.task_id for c in seen if c.state is TaskState.DONE]
        assert len(ended) == len(set(ended))  # a task moves to done at most once
        assert len(ended) > TASKS // 2  # and the rounds got work done
        leased_by = {
            c.device.split("/")[0] for c in seen if c.state is TaskState.SCHEDULED if c.device
        }
        assert leased_by == {"na", "nb"}  # both orchestrators won leases
        await asyncio.sleep(0.3)  # both watchers deliver the last writes
        for task_id in (f"t{i}" for i in range(TASKS)):
            ra, rb = await a.queue.get(task_id), await b.queue.get(task_id)
            assert ra == rb, task_id
            assert ra is not None and ra.lease_token == ra.attempts + _released(seen, task_id)
            if ra.state is TaskState.DONE:
                assert task_id in ended


def _released(seen: list[Change], task_id: str) -> int:
    """Attempts handed back untried (released) do not count; their leases did."""
    return sum(
        1
        for c in seen
        if c.task_id == task_id
        and c.previous is TaskState.SCHEDULED
        and c.state is TaskState.QUEUED
        and c.error is None
    )
