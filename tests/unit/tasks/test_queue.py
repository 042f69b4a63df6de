"""The task queues on their own: durability, leases, idempotent completion, order, paging.

The tests that go through the ``TaskQueue`` Protocol only run on both queues, the embedded
``SqliteQueue`` and the pool's ``JetStreamQueue`` (on a real nats-server): the fixture
``queue``. The SQLite-specific ones (files, query plans, group commit, migrations) take
``sqlite_queue``."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.natsserver import NatsServer
from tests.unit.pool.jsqueue_support import jetstream_queue
from tests.unit.tasks.queue_support import T0, delay, new

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import (
    Grant,
    Outcome,
    OutcomeKind,
    TaskState,
    TaskType,
)
from vramancer.tasks.queue import TaskQueue
from vramancer.tasks.sqlite_queue import SqliteQueue
from vramancer.tasks.sqlite_rows import OVERDUE_SQL


@pytest.fixture
async def sqlite_queue(tmp_path: Path) -> AsyncIterator[SqliteQueue]:
    q = SqliteQueue(tmp_path / "tasks.sqlite")
    await q.open()
    yield q
    await q.close()


@pytest.fixture(params=["sqlite", "jetstream"])
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskQueue]:
    """Each queue in turn, empty and open."""
    if request.param == "sqlite":
        q = SqliteQueue(tmp_path / "tasks.sqlite")
        await q.open()
        yield q
        await q.close()
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    async with jetstream_queue(server.url) as js_queue:
        yield js_queue


async def lease_one(q: TaskQueue, task_id: str, now: float = T0, worker: str = "w1") -> int:
    leased, _ = await q.lease([Grant(task_id, "gpu:0")], worker=worker, now=now, lease_s=30)
    assert [r.task_id for r in leased] == [task_id]
    return leased[0].lease_token


async def test_acknowledged_tasks_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite"
    q = SqliteQueue(path)
    await q.open()
    results, changes = await q.submit([new("a"), new("b")], T0)
    assert [(r.task_id, r.created) for r in results] == [("a", True), ("b", True)]
    assert [(c.task_id, c.previous, c.state) for c in changes] == [
        ("a", None, TaskState.QUEUED),
        ("b", None, TaskState.QUEUED),
    ]
    await q.close()
    q2 = SqliteQueue(path)
    await q2.open()
    assert [r.task_id for r in await q2.ready(maintenance=False, limit=10)] == ["a", "b"]
    await q2.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_ready_order_priority_then_expected_duration_then_submission(
    queue: TaskQueue,
) -> None:
    await queue.submit(
        [
            new("slow-normal", estimate_s=100),
            new("fast-normal", estimate_s=1),
            new("bg", priority=Priority.BACKGROUND, estimate_s=0.1),
            new("high", priority=Priority.HIGH, estimate_s=500),
            new("fast-normal-2", estimate_s=1),
            new("noop", kind=TaskType.NOOP),
        ],
        T0,
    )
    order = [r.task_id for r in await queue.ready(maintenance=False, limit=10)]
    assert order == ["high", "fast-normal", "fast-normal-2", "slow-normal", "bg"]
    assert [r.task_id for r in await queue.ready(maintenance=True, limit=10)] == ["noop"]


async def test_idempotency_key_returns_the_first_task(queue: TaskQueue) -> None:
    results, changes = await queue.submit([new("a", key="k"), new("b", key="k")], T0)
    assert [(r.task_id, r.created) for r in results] == [("a", True), ("a", False)]
    assert len(changes) == 1
    results, changes = await queue.submit([new("c", key="k"), new("a")], T0)
    assert [(r.task_id, r.created) for r in results] == [("a", False), ("a", False)]
    assert changes == []


async def test_a_lease_is_exclusive_and_completion_is_idempotent(queue: TaskQueue) -> None:
    await queue.submit([new("a")], T0)
    token = await lease_one(queue, "a")
    again, _ = await queue.lease([Grant("a", "gpu:1")], worker="w2", now=T0, lease_s=30)
    assert again == []
    ok = Outcome("a", token, OutcomeKind.OK, exit_code=0, run_s=1.5)
    first = await queue.finish([ok], now=T0 + 2, retry_delay=delay)
    assert [(c.previous, c.state, c.run_s) for c in first] == [
        (TaskState.SCHEDULED, TaskState.DONE, 1.5)
    ]
    assert await queue.finish([ok], now=T0 + 3, retry_delay=delay) == []  # repeated: no change
    late_error = Outcome("a", token, OutcomeKind.ERROR, exit_code=1)
    assert await queue.finish([late_error], now=T0 + 4, retry_delay=delay) == []
    record = await queue.get("a")
    assert record is not None
    assert (record.state, record.exit_code, record.finished_at) == (TaskState.DONE, 0, T0 + 2)
    assert await queue.learned_durations() == {"cmd:true": 1.5}


async def test_a_stale_lease_cannot_complete_the_new_attempt(queue: TaskQueue) -> None:
    await queue.submit([new("a")], T0)
    old = await lease_one(queue, "a", worker="w1")
    changes, orphans = await queue.expire_leases(T0 + 31)
    assert [(c.previous, c.state) for c in changes] == [(TaskState.SCHEDULED, TaskState.QUEUED)]
    assert orphans == []
    new_token = await lease_one(queue, "a", now=T0 + 32, worker="w2")
    assert new_token != old
    stale = await queue.finish(
        [Outcome("a", old, OutcomeKind.OK, exit_code=0)], now=T0 + 33, retry_delay=delay
    )
    assert stale == []
    record = await queue.get("a")
    assert record is not None and record.state is TaskState.SCHEDULED and record.attempts == 2


async def test_heartbeat_keeps_a_lease_and_expiry_takes_it_back(queue: TaskQueue) -> None:
    await queue.submit([new("a"), new("b")], T0)
    await lease_one(queue, "a", worker="w1")
    await lease_one(queue, "b", worker="w2")
    assert await queue.heartbeat("w1", now=T0 + 20, lease_s=30) == 1
    changes, _ = await queue.expire_leases(T0 + 40)
    assert [c.task_id for c in changes] == ["b"]  # w2 stopped heartbeating at T0 (+30)
    changes, _ = await queue.expire_leases(T0 + 51)
    assert [c.task_id for c in changes] == ["a"]


async def test_retry_with_backoff_then_failure(queue: TaskQueue) -> None:
    await queue.submit([new("a", max_retries=1)], T0)
    token = await lease_one(queue, "a")
    err = Outcome("a", token, OutcomeKind.ERROR, exit_code=7, error="exit code 7")
    changes = await queue.finish([err], now=T0 + 1, retry_delay=delay)
    assert [(c.state, c.attempts) for c in changes] == [(TaskState.RETRY, 1)]
    record = await queue.get("a")
    assert record is not None and record.not_before == T0 + 11
    assert await queue.promote_due(T0 + 10.9) == []
    promoted = await queue.promote_due(T0 + 11)
    assert [(c.previous, c.state) for c in promoted] == [(TaskState.RETRY, TaskState.QUEUED)]
    token = await lease_one(queue, "a", now=T0 + 12)
    err = Outcome("a", token, OutcomeKind.ERROR, exit_code=7, error="exit code 7")
    changes = await queue.finish([err], now=T0 + 13, retry_delay=delay)
    assert [(c.state, c.attempts, c.exit_code) for c in changes] == [(TaskState.FAILED, 2, 7)]


async def test_a_fatal_error_fails_at_once_with_retries_left(queue: TaskQueue) -> None:
    await queue.submit([new("a", max_retries=2)], T0)
    token = await lease_one(queue, "a")
    why = "cannot start the program: No such file or directory; not retried"
    fatal = Outcome("a", token, OutcomeKind.FATAL, error=why)
    changes = await queue.finish([fatal], now=T0 + 1, retry_delay=delay)
    assert [(c.previous, c.state, c.attempts, c.error) for c in changes] == [
        (TaskState.SCHEDULED, TaskState.FAILED, 1, why)
    ]
    record = await queue.get("a")
    assert record is not None
    assert (record.state, record.error, record.not_before) == (TaskState.FAILED, why, None)
    assert record.finished_at == T0 + 1
    assert await queue.promote_due(T0 + 1000) == []


async def test_released_goes_back_without_counting_an_attempt(queue: TaskQueue) -> None:
    await queue.submit([new("a")], T0)
    token = await lease_one(queue, "a")
    changes = await queue.finish(
        [Outcome("a", token, OutcomeKind.RELEASED, error="no room")], now=T0, retry_delay=delay
    )
    assert [(c.state, c.attempts) for c in changes] == [(TaskState.QUEUED, 0)]


async def test_cancel_in_each_state(queue: TaskQueue) -> None:
    await queue.submit([new("q"), new("r")], T0)
    record, changes = await queue.cancel("q", T0)
    assert record is not None and record.state is TaskState.CANCELLED
    assert [(c.previous, c.state) for c in changes] == [(TaskState.QUEUED, TaskState.CANCELLED)]
    token = await lease_one(queue, "r")
    record, changes = await queue.cancel("r", T0)
    assert record is not None and record.state is TaskState.SCHEDULED and record.cancel_requested
    assert changes == []
    # The worker reports an error after the cancel: the task still ends cancelled, not retried.
    ended = await queue.finish(
        [Outcome("r", token, OutcomeKind.ERROR, exit_code=-15)], now=T0, retry_delay=delay
    )
    assert [c.state for c in ended] == [TaskState.CANCELLED]
    record, changes = await queue.cancel("r", T0)
    assert record is not None and record.state is TaskState.CANCELLED and changes == []
    assert await queue.cancel("missing", T0) == (None, [])


async def test_restart_takes_back_every_lease_and_reports_processes(queue: TaskQueue) -> None:
    await queue.submit([new("a"), new("b"), new("c")], T0)
    token = await lease_one(queue, "a")
    await queue.mark_running("a", token, pid=4242, pid_started=123.0, now=T0)
    await lease_one(queue, "b")
    await queue.cancel("b", T0)
    changes, orphans = await queue.expire_leases(T0 + 1, all_leases=True)
    assert sorted((c.task_id, c.previous, c.state) for c in changes) == [
        ("a", TaskState.RUNNING, TaskState.QUEUED),
        ("b", TaskState.SCHEDULED, TaskState.CANCELLED),
    ]
    assert [(o.task_id, o.pid, o.pid_started) for o in orphans] == [("a", 4242, 123.0)]


async def test_history_pages_newest_first_with_filters(queue: TaskQueue) -> None:
    await queue.submit([new(f"t{i:02d}") for i in range(25)], T0)
    await queue.submit([new(f"u{i:02d}") for i in range(5)], T0 + 100)
    token = await lease_one(queue, "t03")
    await queue.finish([Outcome("t03", token, OutcomeKind.OK)], now=T0, retry_delay=delay)
    seen: list[str] = []
    cursor = None
    while True:
        page = await queue.history(state=None, since=None, cursor=cursor, limit=7)
        seen += [r.task_id for r in page.tasks]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"u{i:02d}" for i in reversed(range(5))] + [
        f"t{i:02d}" for i in reversed(range(25))
    ]
    done = await queue.history(state=TaskState.DONE, since=None, cursor=None, limit=10)
    assert [r.task_id for r in done.tasks] == ["t03"] and done.next_cursor is None
    recent = await queue.history(state=None, since=T0 + 50, cursor=None, limit=3)
    assert [r.task_id for r in recent.tasks] == ["u04", "u03", "u02"]
    rest = await queue.history(state=None, since=T0 + 50, cursor=recent.next_cursor, limit=3)
    assert [r.task_id for r in rest.tasks] == ["u01", "u00"] and rest.next_cursor is None
    assert (await queue.history(state=None, since=T0 + 500, cursor=None, limit=3)).tasks == []


async def test_hot_queries_use_indexes_not_scans(sqlite_queue: SqliteQueue) -> None:
    conn = sqlite3.connect(sqlite_queue.path)

    def plan(sql: str, *params: object) -> str:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        return " | ".join(str(r[-1]) for r in rows)

    ready = plan(
        "SELECT id FROM tasks WHERE state IN ('queued', 'waiting_gpu') AND lane = ? "
        "ORDER BY prio DESC, est_ms, seq LIMIT 10",
        0,
    )
    assert "USING INDEX tasks_ready" in ready and "TEMP B-TREE" not in ready
    by_state = plan(
        "SELECT id FROM tasks WHERE seq < ? AND state = ? ORDER BY seq DESC LIMIT 10", 5, "done"
    )
    assert "tasks_state_seq" in by_state and "TEMP B-TREE" not in by_state
    retry = plan("SELECT id FROM tasks WHERE state = 'retry' AND not_before <= ?", T0)
    assert "USING INDEX tasks_state_seq (state=?)" in retry
    leased = plan(
        "SELECT id FROM tasks WHERE state IN ('scheduled', 'running') AND lease_expires < ?", T0
    )
    assert "USING INDEX tasks_state_seq (state=?)" in leased
    heartbeat = plan(
        "SELECT id FROM tasks WHERE worker = ? AND state IN ('scheduled', 'running')", "w"
    )
    assert "USING INDEX tasks_state_seq (state=?)" in heartbeat
    since = plan("SELECT seq FROM tasks WHERE submitted_at >= ? ORDER BY submitted_at LIMIT 1", T0)
    assert "tasks_submitted" in since
    overdue = plan(OVERDUE_SQL, T0, 8)
    assert "USING INDEX tasks_user_age (ready_at<?)" in overdue
    assert "TEMP B-TREE" not in overdue
    purge = plan(
        "SELECT seq FROM tasks WHERE seq < ? AND state IN ('done', 'failed', 'cancelled') "
        "AND finished_at < ? LIMIT 100",
        10,
        T0,
    )
    assert "USING INDEX tasks_state_seq (state=? AND seq<?)" in purge
    assert "TEMP B-TREE" not in purge
    conn.close()


async def test_group_commit_keeps_concurrent_operations_apart(sqlite_queue: SqliteQueue) -> None:
    """Many writers at once share transactions; one failing operation undoes only itself."""
    batches = [[new(f"b{i}-{j}") for j in range(20)] for i in range(20)]
    duplicate_id = [new("b0-0")]  # a given id already taken: returns the old, no error
    results = await asyncio.gather(
        *(sqlite_queue.submit(b, T0) for b in batches), sqlite_queue.submit(duplicate_id, T0)
    )
    assert sum(len(changes) for _, changes in results) == 400

    def failing(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO durations (key, mean_s, n) VALUES ('x', 1, 1)")
        raise RuntimeError("boom")

    outcome = await asyncio.gather(
        sqlite_queue._write(failing),
        sqlite_queue.submit([new("after")], T0),
        return_exceptions=True,
    )
    assert isinstance(outcome[0], RuntimeError)
    assert await sqlite_queue.learned_durations() == {}  # the failed op's insert was rolled back
    assert await sqlite_queue.get("after") is not None
    counts = await sqlite_queue.counts()
    assert counts == {(False, TaskState.QUEUED): 401}


async def test_run_times_fold_into_a_moving_average_per_command(queue: TaskQueue) -> None:
    await queue.submit([new("a"), new("b"), new("c")], T0)
    tokens = {t: await lease_one(queue, t) for t in ("a", "b", "c")}
    await queue.finish(
        [
            Outcome("a", tokens["a"], OutcomeKind.OK, run_s=1.0),
            Outcome("b", tokens["b"], OutcomeKind.OK, run_s=3.0),
            Outcome("c", tokens["c"], OutcomeKind.ERROR, run_s=100.0),  # failures teach nothing
        ],
        now=T0,
        retry_delay=delay,
    )
    assert await queue.learned_durations() == {"cmd:true": pytest.approx(1.6)}  # 1 + 0.3 * 2


async def test_a_task_that_keeps_losing_its_lease_ends_failed(queue: TaskQueue) -> None:
    """A task whose worker dies every time (it kills the daemon) must not crash-loop it."""
    await queue.submit([new("crash"), new("cancelled")], T0)
    errors = []
    for i in range(3):
        now = T0 + 100 * i
        await lease_one(queue, "crash", now=now)
        changes, _ = await queue.expire_leases(now + 1, all_leases=True, max_lease_losses=3)
        assert [c.task_id for c in changes] == ["crash"]
        errors.append((changes[0].state, changes[0].error))
    assert errors == [
        (TaskState.QUEUED, "lease lost: worker gone; queued again (lease losses: 1 of 3)"),
        (TaskState.QUEUED, "lease lost: worker gone; queued again (lease losses: 2 of 3)"),
        (
            TaskState.FAILED,
            "lease lost 3 times: its worker or the daemon died while running it each time; "
            "not run again ([tasks] max_lease_losses = 3)",
        ),
    ]
    record = await queue.get("crash")
    assert record is not None
    assert (record.state, record.attempts, record.lease_losses) == (TaskState.FAILED, 3, 3)
    assert record.finished_at == T0 + 201
    # A cancel asked before the loss wins over the cap.
    await lease_one(queue, "cancelled")
    await queue.cancel("cancelled", T0)
    changes, _ = await queue.expire_leases(T0 + 1, all_leases=True, max_lease_losses=1)
    assert [(c.task_id, c.state) for c in changes] == [("cancelled", TaskState.CANCELLED)]


async def test_lost_leases_do_not_use_up_retries(queue: TaskQueue) -> None:
    await queue.submit([new("a", max_retries=1)], T0)
    await lease_one(queue, "a")
    await queue.expire_leases(T0 + 1, all_leases=True)  # attempt 1: lease lost
    token = await lease_one(queue, "a", now=T0 + 2)
    err = Outcome("a", token, OutcomeKind.ERROR, exit_code=1)
    changes = await queue.finish([err], now=T0 + 3, retry_delay=delay)
    assert [(c.state, c.attempts) for c in changes] == [(TaskState.RETRY, 2)]  # its one retry
    await queue.promote_due(T0 + 100)
    token = await lease_one(queue, "a", now=T0 + 100)
    err = Outcome("a", token, OutcomeKind.ERROR, exit_code=1)
    changes = await queue.finish([err], now=T0 + 101, retry_delay=delay)
    assert [(c.state, c.attempts) for c in changes] == [(TaskState.FAILED, 3)]


async def test_overdue_lists_the_longest_waiting_ready_tasks(queue: TaskQueue) -> None:
    await queue.submit([new("old"), new("noop-old", kind=TaskType.NOOP)], T0)
    await queue.submit([new("mid")], T0 + 10)
    await queue.submit([new("new")], T0 + 20)
    await queue.submit([new("requeued")], T0 + 1)
    await lease_one(queue, "requeued", now=T0 + 1)
    await queue.expire_leases(T0 + 15, all_leases=True)  # ready again since T0 + 15
    await queue.set_waiting([("mid", "no room", TaskState.QUEUED)], T0 + 12)
    await queue.cancel("old", T0 + 12)
    await queue.submit([new("older")], T0 - 5)

    async def ids(ready_before: float, limit: int = 10) -> list[str]:
        page, found = await queue.dispatch_view(
            limit=0, overdue_before=ready_before, overdue_limit=limit
        )
        assert page == []
        return [r.task_id for r in found]

    assert await ids(T0 + 100) == ["older", "mid", "requeued", "new"]  # waiting_gpu included
    assert await ids(T0 + 100, limit=2) == ["older", "mid"]
    assert await ids(T0 + 12) == ["older", "mid"]
    assert await ids(T0 - 10) == []  # and "noop-old" never: maintenance tasks do not age
    page, none = await queue.dispatch_view(limit=2, overdue_before=None, overdue_limit=5)
    assert none == []  # aging off
    expected = [r.task_id for r in await queue.ready(maintenance=False, limit=2)]
    assert [r.task_id for r in page] == expected == ["mid", "new"]  # submission order
    record = await queue.get("requeued")
    assert record is not None and record.ready_at == T0 + 15


async def test_set_waiting_reports_the_change_once_and_refreshes_the_reason(
    queue: TaskQueue,
) -> None:
    await queue.submit([new("a")], T0)
    first = await queue.set_waiting([("a", "gpu:0 too hot", TaskState.QUEUED)], T0)
    assert [(c.previous, c.state, c.error) for c in first] == [
        (TaskState.QUEUED, TaskState.WAITING_GPU, "gpu:0 too hot")
    ]
    again = await queue.set_waiting([("a", "gpu:0 held", TaskState.WAITING_GPU)], T0 + 1)
    assert again == []  # no state change, but the reason is new
    record = await queue.get("a")
    assert record is not None and (record.state, record.error) == (
        TaskState.WAITING_GPU,
        "gpu:0 held",
    )
    stale = await queue.set_waiting([("a", "stale read", TaskState.QUEUED)], T0 + 2)
    assert stale == []
    record = await queue.get("a")
    assert record is not None and record.error == "gpu:0 held"


async def test_purge_deletes_old_ended_tasks_in_batches_never_the_newest(
    queue: TaskQueue,
) -> None:
    await queue.submit([new(f"old{i}") for i in range(5)], T0)
    await queue.submit([new("old-waiting")], T0)
    for i in range(5):
        token = await lease_one(queue, f"old{i}", now=T0)
        await queue.finish(
            [Outcome(f"old{i}", token, OutcomeKind.OK)], now=T0 + i, retry_delay=delay
        )
    await queue.submit([new("recent")], T0 + 1000)
    token = await lease_one(queue, "recent", now=T0 + 1000)
    await queue.finish([Outcome("recent", token, OutcomeKind.OK)], now=T0 + 1000, retry_delay=delay)

    purged = await queue.purge(ended_before=T0 + 3, limit=2)
    assert [(p.task_id, p.state, p.attempts) for p in purged] == [
        ("old0", TaskState.DONE, 1),
        ("old1", TaskState.DONE, 1),
    ]
    assert [p.task_id for p in await queue.purge(ended_before=T0 + 3, limit=10)] == ["old2"]
    assert await queue.purge(ended_before=T0 + 3, limit=10) == []
    assert [p.task_id for p in await queue.purge(ended_before=T0 + 500, limit=10)] == [
        "old3",
        "old4",
    ]
    assert await queue.get("old-waiting") is not None  # not ended: kept however old
    # Everything ended long ago: all but the newest row go, so seq keeps growing.
    assert await queue.purge(ended_before=T0 + 10**6, limit=10) == []
    assert await queue.get("recent") is not None
    await queue.submit([new("next")], T0 + 2000)
    seqs = {
        r.task_id: r.seq
        for r in (await queue.history(state=None, since=None, cursor=None, limit=10)).tasks
    }
    assert seqs["next"] > seqs["recent"]
    assert await queue.counts() == {(False, TaskState.QUEUED): 2, (False, TaskState.DONE): 1}


async def test_a_database_of_the_first_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite"
    conn = sqlite3.connect(path)
    v1 = (
        "CREATE TABLE tasks (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, idem_key TEXT, "
        "type TEXT NOT NULL, lane INTEGER NOT NULL, prio INTEGER NOT NULL, priority TEXT NOT NULL, "
        "est_ms INTEGER NOT NULL, est_key TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL, "
        "gpu INTEGER, vram_bytes INTEGER NOT NULL, max_retries INTEGER NOT NULL, "
        "timeout_s REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
        "lease_token INTEGER NOT NULL DEFAULT 0, lease_expires REAL, worker TEXT, device TEXT, "
        "pid INTEGER, pid_started REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, "
        "exit_code INTEGER, error TEXT, stdout_tail TEXT NOT NULL DEFAULT '', "
        "stderr_tail TEXT NOT NULL DEFAULT '', submitted_at REAL NOT NULL, ready_at REAL NOT NULL, "
        "scheduled_at REAL, started_at REAL, finished_at REAL, not_before REAL, "
        "updated_at REAL NOT NULL)"
    )
    conn.execute(v1)
    conn.execute(
        "INSERT INTO tasks (id, type, lane, prio, priority, est_ms, est_key, state, spec, "
        "vram_bytes, max_retries, timeout_s, submitted_at, ready_at, updated_at) VALUES "
        "('v1', 'cmd', 0, 1, 'normal', 60000, 'cmd:true', 'queued', "
        """'{"task_id": "v1", "type": "cmd", "cmd": ["true"]}', 0, 2, 60, 1, 1, 1)"""
    )
    conn.execute("CREATE INDEX tasks_ready_age ON tasks(lane, ready_at)")  # as version 2 had
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    q = SqliteQueue(path)
    await q.open()
    try:
        record = await q.get("v1")
        assert record is not None and record.lease_losses == 0 and record.state is TaskState.QUEUED
        assert record.owner == "local"  # tasks from before owners belong to this machine
        page, overdue = await q.dispatch_view(limit=5, overdue_before=2, overdue_limit=5)
        assert [r.task_id for r in page] == [r.task_id for r in overdue] == ["v1"]
    finally:
        await q.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 4
    indexes = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "tasks_user_age" in indexes and "tasks_ready_age" not in indexes
    check.close()


async def test_ids_with_a_prefix_are_bounded_and_in_order(queue: TaskQueue) -> None:
    ids = ["job-a1", "job-a2", "job-a3", "job-b1", "jobz", "other"]
    await queue.submit([new(task_id) for task_id in reversed(ids)], T0)
    assert await queue.ids_with_prefix("job-a", limit=10) == ["job-a1", "job-a2", "job-a3"]
    assert len(await queue.ids_with_prefix("job-", limit=2)) == 2
    assert await queue.ids_with_prefix("job-b1", limit=10) == ["job-b1"]
    assert await queue.ids_with_prefix("JOB-", limit=10) == []  # ids are case-sensitive
    assert await queue.ids_with_prefix("nothing", limit=10) == []


async def test_the_prefix_query_uses_the_id_index(sqlite_queue: SqliteQueue) -> None:
    conn = sqlite3.connect(sqlite_queue.path)
    rows = conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM tasks WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
        ("abcd", "abce", 11),
    ).fetchall()
    plan = " | ".join(str(r[-1]) for r in rows)
    assert "USING COVERING INDEX" in plan and "TEMP B-TREE" not in plan, plan
