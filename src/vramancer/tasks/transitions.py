"""The task state machine as one pure function: ``next_state(task, outcome, now, backoff)``.

Every queue (the embedded SQLite one, a distributed one) decides what happens to a task the
same way, so the decisions live here, without I/O, and a queue only persists the
``Transition`` it is given. What decides:

* an attempt's outcome (``ok``, ``error``, ``fatal``, ``cancelled``, ``released``), for a leased
  task: a released task (it never ran: no room after all, shutdown, preemption) goes back to
  the queue and the attempt is not counted; a cancel asked while it ran wins over how it ended;
  an error is retried after ``backoff(attempts)`` seconds while ``attempts - lease_losses`` is
  at most ``max_retries`` (attempts whose lease was lost are not the task's fault), else it
  fails; a fatal error (one no retry can cure: the program cannot be started) fails at once;
* a lost lease (its worker or daemon died): queued again, or cancelled when a cancel was asked,
  or failed once the lease was lost ``max_lease_losses`` times (a task that keeps killing its
  daemon must not crash-loop it);
* a back-off that is over (``due``): ``retry`` becomes ``queued``;
* a user's cancel: a waiting task ends ``cancelled`` at once, a leased one is marked (its
  worker stops it and reports ``cancelled``), an ended one stays as it is;
* the dispatcher's decisions: a lease hands a ready task (``queued``, ``waiting_gpu``) to a
  worker as a new attempt, ``scheduled`` (or ``running`` at once for the in-process lane); the
  ``running`` mark moves a ``scheduled`` task to ``running`` when its process started; a ready
  task no device has room for waits, ``waiting_gpu`` (one already waiting only gets the new
  reason).

Which report is current (its lease token) is the queue's check: it owns the tokens. The
triggers in ``COUNT_FREE`` depend on the task's state (and, for ``ok``, its cancel mark) only,
never on its counts: ``step`` gives their transition for every task in one state, so a queue
may write it as one guarded update without reading the task first (its fast paths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cache

from vramancer.tasks.model import LEASED_STATES, READY_STATES, OutcomeKind, TaskState
from vramancer.tasks.settings import DEFAULT_MAX_LEASE_LOSSES

#: The error a cancelled task shows.
CANCELLED = "cancelled"


class Trigger(StrEnum):
    """What happens to a task. The first five are an attempt's ``OutcomeKind``."""

    OK = "ok"
    ERROR = "error"
    FATAL = "fatal"
    CANCELLED = "cancelled"
    RELEASED = "released"
    #: The lease was taken back (expired, or held by a daemon that is gone).
    LEASE_LOST = "lease_lost"
    #: The back-off delay (``not_before``) has passed.
    DUE = "due"
    #: A user asked to cancel the task.
    CANCEL = "cancel"
    #: The dispatcher hands a ready task to a worker: a new attempt, ``scheduled``.
    LEASE = "lease"
    #: The same, ``running`` at once (the in-process lane starts it without a process).
    LEASE_RUNNING = "lease_running"
    #: The leased task's process started: the ``running`` mark.
    START = "start"
    #: No device has room for the ready task now: it waits, with the dispatcher's reason.
    WAIT = "wait"

    @classmethod
    def of(cls, kind: OutcomeKind) -> Trigger:
        return cls(kind.value)


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What the state machine reads of a task."""

    state: TaskState
    attempts: int
    max_retries: int = 0
    lease_losses: int = 0
    cancel_requested: bool = False
    #: When its back-off ends (``retry`` only).
    not_before: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """What becomes of a task; the queue writes these fields and nothing else decides."""

    previous: TaskState
    state: TaskState
    attempts: int
    lease_losses: int
    cancel_requested: bool
    #: When a ``retry`` is due (None otherwise: cleared).
    not_before: float | None = None
    #: It became ready now (aging counts from here); None: unchanged.
    ready_at: float | None = None
    #: It ended now; None: unchanged.
    finished_at: float | None = None
    #: It started running now; None: unchanged (cleared when ``leased``).
    started_at: float | None = None
    #: A new attempt under a new lease: the queue issues a fresh lease token and forgets the
    #: previous attempt's exit code, error, process and start.
    leased: bool = False
    #: Back to the queue untried: its device is forgotten.
    clear_device: bool = False
    #: The error it shows from now on when the transition gives one (lost lease, cancel);
    #: None: the attempt's own error (outcomes), the dispatcher's reason (wait) or unchanged.
    reason: str | None = None
    #: Nothing happens (the trigger does not apply to the task's state): write nothing.
    ignored: bool = False

    @property
    def changed(self) -> bool:
        """The state changes (a cancel mark on a leased task does not change it)."""
        return not self.ignored and self.state is not self.previous


Backoff = Callable[[int], float]

#: The triggers whose transition depends on the task's state only (``ok`` also on its cancel
#: mark: ``step`` assumes none was asked), never on its counts, and never changes the mark.
COUNT_FREE = frozenset(
    {Trigger.OK, Trigger.LEASE, Trigger.LEASE_RUNNING, Trigger.START, Trigger.WAIT}
)


def no_backoff(attempts: int) -> float:
    """The ``backoff`` of the triggers that never wait one out (all but an attempt's error)."""
    raise AssertionError(f"no back-off applies here (attempts: {attempts})")


def next_state(
    task: TaskFacts,
    outcome: Trigger,
    now: float,
    backoff: Backoff,
    *,
    max_lease_losses: int = DEFAULT_MAX_LEASE_LOSSES,
) -> Transition:
    """The transition ``outcome`` causes for ``task`` at ``now`` (see the module docstring).
    ``backoff(attempts)``: seconds before the next try after ``attempts`` attempts."""
    if outcome is Trigger.LEASE_LOST:
        return _lost(task, now, max_lease_losses)
    if outcome is Trigger.DUE:
        return _due(task, now)
    if outcome is Trigger.CANCEL:
        return _cancel(task, now)
    if outcome in _DISPATCH:
        return _DISPATCH[outcome](task, now)
    return _ended(task, outcome, now, backoff)


def step(trigger: Trigger, state: TaskState, now: float) -> Transition:
    """The transition of a ``COUNT_FREE`` trigger for every task in ``state`` with no cancel
    asked, whatever its counts: its ``attempts`` and ``lease_losses`` are what to add to the
    task's (a queue writes it as one update guarded on the state, without reading the task)."""
    if trigger not in COUNT_FREE:
        raise ValueError(f"{trigger}: depends on the task's counts; read them for next_state")
    return next_state(TaskFacts(state, 0), trigger, now, no_backoff)


@cache
def sources(trigger: Trigger) -> tuple[TaskState, ...]:
    """The states ``step(trigger, ...)`` applies to (not ignored): its update's guard. Whether a
    count-free trigger applies depends on the task's state alone, not on the time."""
    return tuple(s for s in TaskState if not step(trigger, s, 0.0).ignored)


def _stay(task: TaskFacts) -> Transition:
    return Transition(
        task.state,
        task.state,
        task.attempts,
        task.lease_losses,
        task.cancel_requested,
        not_before=task.not_before,
        ignored=True,
    )


def _to(task: TaskFacts, state: TaskState, now: float) -> Transition:
    """``task`` moves to ``state``; ended now when ``state`` is terminal."""
    return Transition(
        task.state,
        state,
        task.attempts,
        task.lease_losses,
        task.cancel_requested,
        finished_at=now if state.terminal else None,
    )


def _ended(task: TaskFacts, outcome: Trigger, now: float, backoff: Backoff) -> Transition:
    """An attempt ended (``OK``, ``ERROR``, ``FATAL``, ``CANCELLED``, ``RELEASED``)."""
    if task.state not in LEASED_STATES:
        return _stay(task)  # a late or repeated report: the task moved on
    if outcome is Trigger.RELEASED:
        if task.cancel_requested:
            return replace(_to(task, TaskState.CANCELLED, now), attempts=task.attempts - 1)
        return replace(
            _to(task, TaskState.QUEUED, now),
            attempts=task.attempts - 1,
            ready_at=now,
            clear_device=True,
        )
    if task.cancel_requested or outcome is Trigger.CANCELLED:
        return _to(task, TaskState.CANCELLED, now)
    if outcome is Trigger.OK:
        return _to(task, TaskState.DONE, now)
    if outcome is Trigger.ERROR and task.attempts - task.lease_losses <= task.max_retries:
        return replace(_to(task, TaskState.RETRY, now), not_before=now + backoff(task.attempts))
    return _to(task, TaskState.FAILED, now)


def _lost(task: TaskFacts, now: float, max_losses: int) -> Transition:
    if task.state not in LEASED_STATES:
        return _stay(task)
    losses = task.lease_losses + 1
    if task.cancel_requested:
        state, reason = TaskState.CANCELLED, CANCELLED
    elif losses >= max_losses:
        state, reason = (
            TaskState.FAILED,
            (
                f"lease lost {losses} times: its worker or the daemon died while running it each "
                f"time; not run again ([tasks] max_lease_losses = {max_losses})"
            ),
        )
    else:
        state, reason = (
            TaskState.QUEUED,
            (f"lease lost: worker gone; queued again (lease losses: {losses} of {max_losses})"),
        )
    return replace(_to(task, state, now), lease_losses=losses, ready_at=now, reason=reason)


def _due(task: TaskFacts, now: float) -> Transition:
    if task.state is not TaskState.RETRY or task.not_before is None or task.not_before > now:
        return _stay(task)
    return replace(_to(task, TaskState.QUEUED, now), ready_at=now)


def _lease(task: TaskFacts, now: float, *, running: bool = False) -> Transition:
    if task.state not in READY_STATES:
        return _stay(task)
    return Transition(
        task.state,
        TaskState.RUNNING if running else TaskState.SCHEDULED,
        task.attempts + 1,
        task.lease_losses,
        task.cancel_requested,
        started_at=now if running else None,
        leased=True,
    )


def _lease_running(task: TaskFacts, now: float) -> Transition:
    return _lease(task, now, running=True)


def _start(task: TaskFacts, now: float) -> Transition:
    if task.state is not TaskState.SCHEDULED:
        return _stay(task)
    return Transition(
        task.state,
        TaskState.RUNNING,
        task.attempts,
        task.lease_losses,
        task.cancel_requested,
        started_at=now,
    )


def _wait(task: TaskFacts, now: float) -> Transition:
    if task.state is TaskState.QUEUED:
        return _to(task, TaskState.WAITING_GPU, now)
    if task.state is TaskState.WAITING_GPU:  # the dispatcher's new reason, no change of state
        return replace(_stay(task), ignored=False)
    return _stay(task)


_DISPATCH: dict[Trigger, Callable[[TaskFacts, float], Transition]] = {
    Trigger.LEASE: _lease,
    Trigger.LEASE_RUNNING: _lease_running,
    Trigger.START: _start,
    Trigger.WAIT: _wait,
}


def _cancel(task: TaskFacts, now: float) -> Transition:
    if task.state in (*READY_STATES, TaskState.RETRY):
        ended = _to(task, TaskState.CANCELLED, now)
        return replace(ended, not_before=task.not_before, reason=CANCELLED)
    if task.state in LEASED_STATES:
        return replace(_stay(task), cancel_requested=True, ignored=False)
    return _stay(task)
