"""The task state machine (``tasks/transitions.py``): exact transitions, injected times, no I/O."""

from __future__ import annotations

import pytest

from vramancer.tasks.model import OutcomeKind, TaskState
from vramancer.tasks.transitions import (
    COUNT_FREE,
    TaskFacts,
    Transition,
    Trigger,
    next_state,
    no_backoff,
    sources,
    step,
)

NOW = 1000.0
S = TaskState


def backoff(attempts: int) -> float:
    return 10.0 * attempts


def running(**facts: object) -> TaskFacts:
    base: dict[str, object] = {"state": S.RUNNING, "attempts": 1, "max_retries": 2}
    base.update(facts)
    return TaskFacts(**base)  # type: ignore[arg-type]


def test_ok_ends_done() -> None:
    assert next_state(running(), Trigger.OK, NOW, backoff) == Transition(
        S.RUNNING, S.DONE, 1, 0, False, finished_at=NOW
    )


def test_an_error_retries_after_the_backoff_of_its_attempts() -> None:
    t = next_state(running(attempts=2), Trigger.ERROR, NOW, backoff)
    assert t == Transition(S.RUNNING, S.RETRY, 2, 0, False, not_before=NOW + 20.0)
    assert t.changed


def test_an_error_after_the_last_retry_fails() -> None:
    t = next_state(running(attempts=3), Trigger.ERROR, NOW, backoff)
    assert t == Transition(S.RUNNING, S.FAILED, 3, 0, False, finished_at=NOW)


@pytest.mark.parametrize("state", [S.SCHEDULED, S.RUNNING])
def test_a_fatal_error_fails_at_once_with_retries_left(state: TaskState) -> None:
    t = next_state(running(state=state, attempts=1, max_retries=2), Trigger.FATAL, NOW, backoff)
    assert t == Transition(state, S.FAILED, 1, 0, False, finished_at=NOW)


def test_a_fatal_error_of_a_task_with_a_cancel_asked_ends_cancelled() -> None:
    t = next_state(running(cancel_requested=True), Trigger.FATAL, NOW, backoff)
    assert t == Transition(S.RUNNING, S.CANCELLED, 1, 0, True, finished_at=NOW)


def test_lost_leases_are_not_counted_as_retries() -> None:
    t = next_state(running(attempts=3, lease_losses=1), Trigger.ERROR, NOW, backoff)
    assert t == Transition(S.RUNNING, S.RETRY, 3, 1, False, not_before=NOW + 30.0)


def test_released_goes_back_to_the_queue_untried() -> None:
    t = next_state(running(state=S.SCHEDULED, attempts=2), Trigger.RELEASED, NOW, backoff)
    assert t == Transition(S.SCHEDULED, S.QUEUED, 1, 0, False, ready_at=NOW, clear_device=True)


def test_released_while_a_cancel_was_asked_ends_cancelled() -> None:
    t = next_state(running(cancel_requested=True), Trigger.RELEASED, NOW, backoff)
    assert t == Transition(S.RUNNING, S.CANCELLED, 0, 0, True, finished_at=NOW)


@pytest.mark.parametrize("outcome", [Trigger.OK, Trigger.ERROR, Trigger.CANCELLED])
def test_a_cancel_asked_while_running_wins_over_how_it_ended(outcome: Trigger) -> None:
    t = next_state(running(cancel_requested=True), outcome, NOW, backoff)
    assert t == Transition(S.RUNNING, S.CANCELLED, 1, 0, True, finished_at=NOW)


@pytest.mark.parametrize("outcome", [Trigger.OK, Trigger.FATAL])
@pytest.mark.parametrize("state", [S.QUEUED, S.RETRY, S.DONE, S.FAILED, S.CANCELLED])
def test_an_outcome_for_a_task_that_is_not_leased_changes_nothing(
    state: TaskState, outcome: Trigger
) -> None:
    t = next_state(running(state=state), outcome, NOW, backoff)
    assert t.ignored and not t.changed and t.state is state


def test_a_lost_lease_queues_the_task_again_and_counts_the_loss() -> None:
    t = next_state(running(), Trigger.LEASE_LOST, NOW, backoff, max_lease_losses=3)
    assert t == Transition(
        S.RUNNING,
        S.QUEUED,
        1,
        1,
        False,
        ready_at=NOW,
        reason="lease lost: worker gone; queued again (lease losses: 1 of 3)",
    )


def test_the_last_lost_lease_fails_the_task() -> None:
    t = next_state(running(lease_losses=2), Trigger.LEASE_LOST, NOW, backoff, max_lease_losses=3)
    assert (t.state, t.lease_losses, t.finished_at, t.ready_at) == (S.FAILED, 3, NOW, NOW)
    assert t.reason is not None and t.reason.startswith("lease lost 3 times")
    assert "max_lease_losses = 3" in t.reason


def test_a_lost_lease_of_a_cancelled_task_ends_it_cancelled() -> None:
    t = next_state(running(cancel_requested=True), Trigger.LEASE_LOST, NOW, backoff)
    assert t == Transition(
        S.RUNNING, S.CANCELLED, 1, 1, True, ready_at=NOW, finished_at=NOW, reason="cancelled"
    )


def test_a_due_retry_is_queued_and_a_back_off_not_over_waits() -> None:
    retry = TaskFacts(S.RETRY, 1, 2, not_before=NOW)
    assert next_state(retry, Trigger.DUE, NOW, backoff) == Transition(
        S.RETRY, S.QUEUED, 1, 0, False, ready_at=NOW
    )
    assert next_state(retry, Trigger.DUE, NOW - 0.5, backoff).ignored


@pytest.mark.parametrize("state", [S.QUEUED, S.WAITING_GPU])
def test_cancel_ends_a_waiting_task_at_once(state: TaskState) -> None:
    t = next_state(TaskFacts(state, 0), Trigger.CANCEL, NOW, backoff)
    assert t == Transition(state, S.CANCELLED, 0, 0, False, finished_at=NOW, reason="cancelled")


def test_cancel_of_a_task_in_back_off_keeps_when_it_was_due() -> None:
    t = next_state(TaskFacts(S.RETRY, 1, not_before=NOW + 5), Trigger.CANCEL, NOW, backoff)
    assert t == Transition(
        S.RETRY, S.CANCELLED, 1, 0, False, not_before=NOW + 5, finished_at=NOW, reason="cancelled"
    )


def test_cancel_of_a_leased_task_marks_it_without_changing_its_state() -> None:
    t = next_state(running(), Trigger.CANCEL, NOW, backoff)
    assert t == Transition(S.RUNNING, S.RUNNING, 1, 0, True)
    assert not t.ignored and not t.changed


def test_cancel_of_an_ended_task_changes_nothing() -> None:
    assert next_state(TaskFacts(S.DONE, 1), Trigger.CANCEL, NOW, backoff).ignored


def test_every_outcome_kind_is_a_trigger() -> None:
    assert {Trigger.of(kind) for kind in OutcomeKind} == {
        Trigger.OK,
        Trigger.ERROR,
        Trigger.FATAL,
        Trigger.CANCELLED,
        Trigger.RELEASED,
    }


@pytest.mark.parametrize("state", [S.QUEUED, S.WAITING_GPU])
def test_a_lease_starts_a_new_attempt_scheduled(state: TaskState) -> None:
    t = next_state(TaskFacts(state, 2, 3, lease_losses=1), Trigger.LEASE, NOW, backoff)
    assert t == Transition(state, S.SCHEDULED, 3, 1, False, leased=True)
    assert t.changed


def test_a_lease_of_the_in_process_lane_is_running_at_once() -> None:
    t = next_state(TaskFacts(S.QUEUED, 0), Trigger.LEASE_RUNNING, NOW, backoff)
    assert t == Transition(S.QUEUED, S.RUNNING, 1, 0, False, started_at=NOW, leased=True)


@pytest.mark.parametrize("trigger", [Trigger.LEASE, Trigger.LEASE_RUNNING])
@pytest.mark.parametrize("state", [S.SCHEDULED, S.RUNNING, S.RETRY, S.DONE, S.CANCELLED])
def test_only_a_ready_task_is_leased(trigger: Trigger, state: TaskState) -> None:
    assert next_state(TaskFacts(state, 1), trigger, NOW, backoff).ignored


def test_the_running_mark_moves_a_scheduled_task_to_running() -> None:
    t = next_state(running(state=S.SCHEDULED), Trigger.START, NOW, backoff)
    assert t == Transition(S.SCHEDULED, S.RUNNING, 1, 0, False, started_at=NOW)


@pytest.mark.parametrize("state", [S.QUEUED, S.RUNNING, S.RETRY, S.DONE, S.CANCELLED])
def test_the_running_mark_of_a_task_not_scheduled_changes_nothing(state: TaskState) -> None:
    assert next_state(running(state=state), Trigger.START, NOW, backoff).ignored


def test_a_queued_task_without_room_waits() -> None:
    t = next_state(TaskFacts(S.QUEUED, 1), Trigger.WAIT, NOW, backoff)
    assert t == Transition(S.QUEUED, S.WAITING_GPU, 1, 0, False)
    assert t.changed


def test_a_waiting_task_only_gets_the_new_reason() -> None:
    t = next_state(TaskFacts(S.WAITING_GPU, 1), Trigger.WAIT, NOW, backoff)
    assert t == Transition(S.WAITING_GPU, S.WAITING_GPU, 1, 0, False)
    assert not t.ignored and not t.changed


@pytest.mark.parametrize("state", [S.SCHEDULED, S.RUNNING, S.RETRY, S.DONE, S.FAILED])
def test_a_task_that_is_not_ready_does_not_wait(state: TaskState) -> None:
    assert next_state(TaskFacts(state, 1), Trigger.WAIT, NOW, backoff).ignored


def test_the_guards_of_the_count_free_triggers() -> None:
    assert sources(Trigger.OK) == (S.SCHEDULED, S.RUNNING)
    assert sources(Trigger.LEASE) == (S.QUEUED, S.WAITING_GPU)
    assert sources(Trigger.LEASE_RUNNING) == (S.QUEUED, S.WAITING_GPU)
    assert sources(Trigger.START) == (S.SCHEDULED,)
    assert sources(Trigger.WAIT) == (S.QUEUED, S.WAITING_GPU)
    assert step(Trigger.OK, S.RUNNING, NOW) == Transition(
        S.RUNNING, S.DONE, 0, 0, False, finished_at=NOW
    )


@pytest.mark.parametrize("trigger", sorted(COUNT_FREE))
@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize(("attempts", "losses"), [(0, 0), (1, 0), (3, 2), (7, 1)])
def test_a_step_is_next_state_whatever_the_counts(
    trigger: Trigger, state: TaskState, attempts: int, losses: int
) -> None:
    """What lets a queue write a count-free trigger as one update without reading the task:
    adding the step's counts to the task's gives ``next_state``'s, and a cancel mark is kept
    (``ok`` aside, whose guard requires none)."""
    rel = step(trigger, state, NOW)
    marks = [False] if trigger is Trigger.OK else [False, True]
    for cancel in marks:
        facts = TaskFacts(state, attempts, 1, lease_losses=losses, cancel_requested=cancel)
        exact = next_state(facts, trigger, NOW, no_backoff)
        shifted = Transition(
            state,
            rel.state,
            attempts + rel.attempts,
            losses + rel.lease_losses,
            cancel,
            not_before=rel.not_before,
            ready_at=rel.ready_at,
            finished_at=rel.finished_at,
            started_at=rel.started_at,
            leased=rel.leased,
            clear_device=rel.clear_device,
            reason=rel.reason,
            ignored=rel.ignored,
        )
        assert exact == shifted


@pytest.mark.parametrize("trigger", sorted(COUNT_FREE))
def test_whether_a_step_applies_does_not_depend_on_the_time(trigger: Trigger) -> None:
    for state in S:
        applies = {not step(trigger, state, now).ignored for now in (0.0, NOW, 1e9)}
        assert applies == {state in sources(trigger)}


def test_a_step_of_a_trigger_that_reads_the_counts_is_refused() -> None:
    with pytest.raises(ValueError, match="counts"):
        step(Trigger.ERROR, S.RUNNING, NOW)
