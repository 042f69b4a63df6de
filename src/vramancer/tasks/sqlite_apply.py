"""Persisting the state machine's decisions in SQLite: each ``Transition`` that
``transitions.next_state`` (or its ``step``) gives is written as one guarded UPDATE; nothing
here decides what becomes of a task.

A trigger that depends on the task's counts (an attempt's error, a lost lease, a back-off that
is over, a cancel) reads the task's facts, asks ``next_state`` and writes the answer
(``apply``). A count-free one (a lease, the ``running`` mark, ``waiting_gpu``, an attempt
ended ``ok``) takes ``step`` once per batch and writes it as one UPDATE guarded on the states
it applies to, without reading the task first: the hot paths. Which report is current is the
queue's check: an update under an older lease token changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache
from typing import Any

from vramancer.tasks.model import (
    LEASED_STATES,
    Change,
    Grant,
    Outcome,
    OutcomeKind,
    TaskRecord,
    TaskState,
    TaskType,
)
from vramancer.tasks.queue import Orphan
from vramancer.tasks.sqlite_rows import COLS, FACTS, to_facts, to_record
from vramancer.tasks.transitions import (
    Transition,
    Trigger,
    next_state,
    no_backoff,
    sources,
    step,
)

#: A count-free trigger's update: the states it is guarded on, and the step it writes.
Step = tuple[tuple[TaskState, ...], Transition]
#: The lease step per ``Grant.running``.
LEASES = {False: Trigger.LEASE, True: Trigger.LEASE_RUNNING}

#: A lease (``next_state``'s ``LEASE`` step, a new attempt); ``{states}``: its guard.
LEASE_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, not_before = ?, started_at = ?, "
    "lease_token = lease_token + 1, lease_expires = ?, worker = ?, device = ?, scheduled_at = ?, "
    "exit_code = NULL, error = NULL, pid = NULL, pid_started = NULL, updated_at = ? "
    f"WHERE id = ? AND state IN ({{states}}) RETURNING {COLS}"
)
#: The ``running`` mark (the ``START`` step) under the lease token.
START_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, started_at = coalesce(?, started_at), "
    "pid = ?, pid_started = ?, updated_at = ? WHERE id = ? AND lease_token = ? "
    "AND state IN ({states}) RETURNING attempts, device, ready_at, type"
)
#: ``waiting_gpu`` with the dispatcher's reason (the ``WAIT`` step from the state it read).
WAIT_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, error = ?, updated_at = ? "
    "WHERE id = ? AND state = ? AND error IS NOT ? RETURNING attempts, type"
)
#: A transition ``next_state`` decided from the task's facts, its fields as they are.
APPLY_SQL = (
    "UPDATE tasks SET state = ?, attempts = ?, lease_losses = ?, cancel_requested = ?, "
    "not_before = ?, ready_at = coalesce(?, ready_at), finished_at = coalesce(?, finished_at), "
    "device = CASE WHEN ? THEN NULL ELSE device END, "
    "worker = CASE WHEN ? THEN NULL ELSE worker END, "
    "lease_expires = CASE WHEN ? THEN NULL ELSE lease_expires END, "
    "error = coalesce(?, error), updated_at = ? WHERE id = ?"
)
#: An attempt that ended ``ok`` (the ``OK`` step: no cancel asked) under its lease token.
DONE_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, not_before = ?, "
    "finished_at = coalesce(?, finished_at), worker = CASE WHEN ? THEN NULL ELSE worker END, "
    "lease_expires = CASE WHEN ? THEN NULL ELSE lease_expires END, exit_code = ?, error = NULL, "
    "stdout_tail = ?, stderr_tail = ?, updated_at = ? WHERE id = ? AND lease_token = ? "
    "AND cancel_requested = 0 AND state IN ({states}) "
    "RETURNING attempts, device, est_key, type, started_at IS NOT NULL"
)


def releases_lease(t: Transition) -> bool:
    """Leaving the leased states gives the lease up (worker, expiry)."""
    return t.previous in LEASED_STATES and t.state not in LEASED_STATES


def apply(conn: sqlite3.Connection, task_id: str, t: Transition, now: float) -> None:
    """Persist ``t`` (``next_state``'s decision): the queue decides nothing here. Leaving the
    leased states gives the lease up. (The count-free steps have their own updates.)"""
    unleased = releases_lease(t)
    conn.execute(
        APPLY_SQL,
        (
            t.state,
            t.attempts,
            t.lease_losses,
            t.cancel_requested,
            t.not_before,
            t.ready_at,
            t.finished_at,
            t.clear_device,
            unleased,
            unleased,
            t.reason,
            now,
            task_id,
        ),
    )


def uniform(trigger: Trigger, now: float) -> Step:
    """The guard and the transition of a count-free trigger written as one update: the states
    ``step`` applies it to (which all take the same step), and that step at ``now``."""
    states = _guard(trigger)
    return states, step(trigger, states[0], now)


@cache
def _guard(trigger: Trigger) -> tuple[TaskState, ...]:
    """``sources(trigger)``, once it is checked that they all take the same step."""
    states = sources(trigger)
    steps = {replace(step(trigger, state, 0.0), previous=states[0]) for state in states}
    if len(steps) != 1:
        raise AssertionError(f"{trigger}: not one step from {states}; write one per state")
    return states


@cache
def guarded(sql: str, states: tuple[TaskState, ...]) -> str:
    """``sql`` with one placeholder per state of its guard."""
    return sql.format(states=", ".join("?" * len(states)))


def lease(
    conn: sqlite3.Connection,
    grants: Sequence[Grant],
    steps: dict[bool, Step],
    *,
    worker: str,
    now: float,
    lease_s: float,
) -> tuple[list[TaskRecord], list[Change]]:
    """Lease each granted task still ready (``steps``: the lease step per ``Grant.running``)."""
    leased: list[TaskRecord] = []
    changes: list[Change] = []
    for grant in grants:
        states, t = steps[grant.running]
        row = conn.execute(
            guarded(LEASE_SQL, states),
            (
                t.state,
                t.attempts,
                t.not_before,
                t.started_at,
                now + lease_s,
                worker,
                grant.device,
                now,
                now,
                grant.task_id,
                *states,
            ),
        ).fetchone()
        if row is None:
            continue
        record = to_record(row)
        leased.append(record)
        changes.append(
            Change(
                record.task_id,
                grant.previous,
                t.state,
                record.attempts,
                grant.device,
                wait_s=max(0.0, now - (record.ready_at or now)) if t.started_at else None,
                type=record.type,
            )
        )
    return leased, changes


def mark_running(
    conn: sqlite3.Connection,
    start: Step,
    task_id: str,
    lease_token: int,
    *,
    pid: int | None,
    pid_started: float | None,
    now: float,
) -> list[Change]:
    """The ``running`` mark (``start``: the ``START`` step) under ``lease_token``."""
    states, t = start
    row = conn.execute(
        guarded(START_SQL, states),
        (
            t.state,
            t.attempts,
            t.started_at,
            pid,
            pid_started,
            now,
            task_id,
            lease_token,
            *states,
        ),
    ).fetchone()
    if row is None:
        return []
    return [
        Change(
            task_id,
            t.previous,
            t.state,
            row[0],
            row[1],
            wait_s=max(0.0, now - row[2]),
            type=TaskType(row[3]),
        )
    ]


def set_waiting(
    conn: sqlite3.Connection,
    steps: dict[TaskState, Transition],
    reasons: Sequence[tuple[str, str, TaskState]],
    now: float,
) -> list[Change]:
    """``waiting_gpu`` with the dispatcher's reasons (``steps``: the ``WAIT`` step per state
    the dispatcher read)."""
    changes = []
    for task_id, why, seen in reasons:
        # ``seen``: the state the dispatcher read, the update's guard.
        t = steps[seen]
        if t.ignored:
            continue
        row = conn.execute(WAIT_SQL, (t.state, t.attempts, why, now, task_id, seen, why)).fetchone()
        if row is not None and t.changed:
            changes.append(
                Change(
                    task_id,
                    t.previous,
                    t.state,
                    row[0],
                    error=why,
                    type=TaskType(row[1]),
                )
            )
    return changes


def cancel(
    conn: sqlite3.Connection, task_id: str, now: float
) -> tuple[TaskRecord | None, list[Change]]:
    row = conn.execute(
        f"SELECT device, type, {FACTS} FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()
    if row is None:
        return None, []
    device, kind, *facts = row
    t = next_state(to_facts(facts), Trigger.CANCEL, now, no_backoff)
    changes = []
    if not t.ignored:
        apply(conn, task_id, t, now)
    if t.changed:
        changes.append(transition_change(task_id, t, kind, device))
    record = conn.execute(f"SELECT {COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return to_record(record), changes


def transition_change(task_id: str, t: Transition, kind: str, device: str | None = None) -> Change:
    """The committed change of a transition that carries no outcome (its reason as error)."""
    return Change(
        task_id, t.previous, t.state, t.attempts, device, error=t.reason, type=TaskType(kind)
    )


def promote_due(conn: sqlite3.Connection, now: float) -> list[Change]:
    rows = conn.execute(
        f"SELECT id, type, {FACTS} FROM tasks WHERE state = 'retry' AND not_before <= ?",
        (now,),
    ).fetchall()
    changes = []
    for task_id, kind, *facts in rows:
        t = next_state(to_facts(facts), Trigger.DUE, now, no_backoff)
        if t.changed:
            apply(conn, task_id, t, now)
            changes.append(transition_change(task_id, t, kind))
    return changes


def expire_leases(
    conn: sqlite3.Connection, now: float, *, all_leases: bool, max_lease_losses: int
) -> tuple[list[Change], list[Orphan]]:
    where = "state IN ('scheduled', 'running')"
    params: tuple[Any, ...] = ()
    if not all_leases:
        where += " AND lease_expires < ?"
        params = (now,)
    rows = conn.execute(
        f"SELECT id, device, pid, pid_started, type, {FACTS} FROM tasks WHERE {where}",
        params,
    ).fetchall()
    changes, orphans = [], []
    for task_id, device, pid, pid_started, kind, *facts in rows:
        t = next_state(
            to_facts(facts),
            Trigger.LEASE_LOST,
            now,
            no_backoff,
            max_lease_losses=max_lease_losses,
        )
        apply(conn, task_id, t, now)
        changes.append(transition_change(task_id, t, kind, device))
        if pid is not None:
            orphans.append(Orphan(task_id, pid, pid_started))
    return changes, orphans


def finish(
    conn: sqlite3.Connection,
    outcomes: Sequence[Outcome],
    *,
    now: float,
    retry_delay: Callable[[int], float],
    done: Step,
    alpha: float,
) -> list[Change]:
    """Apply the attempts' outcomes; learn the run times of the tasks that ended done."""
    changes = []
    for outcome in outcomes:
        change = _finish_one(conn, outcome, now, retry_delay, done)
        if change is not None:
            changes.append(change)
    _learn(conn, changes, alpha)
    return changes


def _learn(conn: sqlite3.Connection, changes: Sequence[Change], alpha: float) -> None:
    """Fold the run times of the tasks that ended done into the moving average per command:
    one read and one write per command, however many tasks ended."""
    runs: dict[str, list[float]] = {}
    for change in changes:
        if change.state is TaskState.DONE and change.estimate_key and change.run_s is not None:
            runs.setdefault(change.estimate_key, []).append(change.run_s)
    for key, values in runs.items():
        row = conn.execute("SELECT mean_s, n FROM durations WHERE key = ?", (key,)).fetchone()
        mean, n = (None, 0) if row is None else row
        for value in values:
            mean = value if mean is None else mean + alpha * (value - mean)
        conn.execute(
            "INSERT OR REPLACE INTO durations (key, mean_s, n) VALUES (?, ?, ?)",
            (key, mean, n + len(values)),
        )


def _finish_one(
    conn: sqlite3.Connection,
    outcome: Outcome,
    now: float,
    retry_delay: Callable[[int], float],
    done: Step,
) -> Change | None:
    if outcome.kind is OutcomeKind.OK:
        change = _finish_done(conn, outcome, now, done)
        if change is not None:
            return change
    row = conn.execute(
        f"SELECT lease_token, device, est_key, type, {FACTS} FROM tasks WHERE id = ?",
        (outcome.task_id,),
    ).fetchone()
    if row is None:
        return None
    token, device, est_key, kind, *facts = row
    if token != outcome.lease_token:
        return None  # a stale report: the task was leased again since
    t = next_state(to_facts(facts), Trigger.of(outcome.kind), now, retry_delay)
    if t.ignored:
        return None  # a repeated report: the task already moved on
    apply(conn, outcome.task_id, t, now)
    conn.execute(
        "UPDATE tasks SET exit_code = ?, error = ?, stdout_tail = ?, stderr_tail = ? WHERE id = ?",
        (
            outcome.exit_code,
            outcome.error,
            outcome.stdout_tail,
            outcome.stderr_tail,
            outcome.task_id,
        ),
    )
    return Change(
        outcome.task_id,
        t.previous,
        t.state,
        t.attempts,
        device,
        exit_code=outcome.exit_code,
        error=outcome.error,
        run_s=outcome.run_s if outcome.kind is not OutcomeKind.RELEASED else None,
        type=TaskType(kind),
        estimate_key=est_key if t.state is TaskState.DONE else None,
    )


def _finish_done(
    conn: sqlite3.Connection,
    outcome: Outcome,
    now: float,
    done: Step,
) -> Change | None:
    """The common case in one statement: ``done`` (the ``OK`` step and its guard) written
    without reading the task first; None: not applicable (cancel asked, stale, moved on)."""
    states, t = done
    unleased = releases_lease(t)
    row = conn.execute(
        guarded(DONE_SQL, states),
        (
            t.state,
            t.attempts,
            t.not_before,
            t.finished_at,
            unleased,
            unleased,
            outcome.exit_code,
            outcome.stdout_tail,
            outcome.stderr_tail,
            now,
            outcome.task_id,
            outcome.lease_token,
            *states,
        ),
    ).fetchone()
    if row is None:
        return None
    attempts, device, est_key, kind, was_running = row
    return Change(
        outcome.task_id,
        TaskState.RUNNING if was_running else TaskState.SCHEDULED,
        t.state,
        attempts,
        device,
        exit_code=outcome.exit_code,
        run_s=outcome.run_s,
        type=TaskType(kind),
        estimate_key=est_key,
    )
