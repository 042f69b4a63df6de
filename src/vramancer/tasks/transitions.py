"""The task state machine as one pure function: ``next_state(task, outcome, now, backoff)``.

Every queue (the embedded SQLite one, a distributed one) decides what happens to a task the
same way, so the decisions live here, without I/O, and a queue only persists the
``Transition`` it is given. What decides:

* an attempt's outcome (``ok``, ``error``, ``cancelled``, ``released``), for a leased task: a
  released task (it never ran: no room after all, shutdown, preemption) goes back to the queue
  and the attempt is not counted; a cancel asked while it ran wins over how it ended; an error
  is retried after ``backoff(attempts)`` seconds while ``attempts - lease_losses`` is at most
  ``max_retries`` (attempts whose lease was lost are not the task's fault), else it fails;
* a lost lease (its worker or daemon died): queued again, or cancelled when a cancel was asked,
  or failed once the lease was lost ``max_lease_losses`` times (a task that keeps killing its
  daemon must not crash-loop it);
* a back-off that is over (``due``): ``retry`` becomes ``queued``;
* a user's cancel: a waiting task ends ``cancelled`` at once, a leased one is marked (its
  worker stops it and reports ``cancelled``), an ended one stays as it is.

Which report is current (its lease token) is the queue's check: it owns the tokens.
Leasing (``queued``/``waiting_gpu`` to ``scheduled``/``running``), the ``running`` mark and
``waiting_gpu`` are guarded updates of one state each, left to the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from vramancer.tasks.model import LEASED_STATES, READY_STATES, OutcomeKind, TaskState
from vramancer.tasks.settings import DEFAULT_MAX_LEASE_LOSSES

#: The error a cancelled task shows.
CANCELLED = "cancelled"


class Trigger(StrEnum):
    """What happens to a task. The first four are an attempt's ``OutcomeKind``."""

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"
    RELEASED = "released"
    #: The lease was taken back (expired, or held by a daemon that is gone).
    LEASE_LOST = "lease_lost"
    #: The back-off delay (``not_before``) has passed.
    DUE = "due"
    #: A user asked to cancel the task.
    CANCEL = "cancel"

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
    #: Back to the queue untried: its device is forgotten.
    clear_device: bool = False
    #: The error it shows from now on when the transition gives one (lost lease, cancel);
    #: None: the attempt's own error (outcomes) or unchanged.
    reason: str | None = None
    #: Nothing happens (the trigger does not apply to the task's state): write nothing.
    ignored: bool = False

    @property
    def changed(self) -> bool:
        """The state changes (a cancel mark on a leased task does not change it)."""
        return not self.ignored and self.state is not self.previous


Backoff = Callable[[int], float]


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
    return _ended(task, outcome, now, backoff)


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
    """An attempt ended (``OK``, ``ERROR``, ``CANCELLED``, ``RELEASED``)."""
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
    if task.attempts - task.lease_losses <= task.max_retries:
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


def _cancel(task: TaskFacts, now: float) -> Transition:
    if task.state in (*READY_STATES, TaskState.RETRY):
        ended = _to(task, TaskState.CANCELLED, now)
        return replace(ended, not_before=task.not_before, reason=CANCELLED)
    if task.state in LEASED_STATES:
        return replace(_stay(task), cancel_requested=True, ignored=False)
    return _stay(task)
