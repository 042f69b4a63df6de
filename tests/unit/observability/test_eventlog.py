"""The daemon's event log: one line per event people act on, durations from the bus's clock."""

from __future__ import annotations

import logging

import pytest

from vramancer import event_types as ev
from vramancer.events import EventBus
from vramancer.observability.eventlog import MAX_TRACKED_TASKS, EventLog, format_duration


def task(state: str, previous: str | None, **kw: object) -> ev.TaskStateChanged:
    fields: dict[str, object] = {"attempts": 1, "device": "gpu:1", "exit_code": None}
    fields |= {"error": None, "type": "python", **kw}
    return ev.TaskStateChanged(task_id="t1", state=state, previous=previous, **fields)  # type: ignore[arg-type]


def test_a_task_is_logged_from_submission_to_its_end_with_its_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    bus = EventBus(clock=lambda: now[0])
    EventLog(bus)
    with caplog.at_level(logging.INFO, logger="vramancer.events"):
        bus.publish(task("queued", None))
        bus.publish(task("scheduled", "queued"))  # DEBUG only
        now[0] = 110.0
        bus.publish(task("running", "scheduled"))
        now[0] = 172.0
        bus.publish(task("failed", "running", exit_code=3, error="boom"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "task t1 submitted (python)"),
        ("INFO", "task t1 started on gpu:1 (attempt 1)"),
        ("WARNING", "task t1 failed on gpu:1 after 1 min 2 s, exit code 3: boom"),
    ]


def test_sizes_are_for_people_and_block_moves_stay_out_of_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    log = EventLog(bus)
    with caplog.at_level(logging.INFO, logger="vramancer.events"):
        bus.publish(ev.AllocationGranted(
            id="a1", workload_type="llm", priority="high", memory_bytes=6005107712,
            quality_target=1.0, device="gpu:0", owner="me", created_at=0.0, preemptible=True,
            min_quality=None,
        ))  # fmt: skip
        bus.publish(ev.BlockPut(id="b", tier="L4", size=10))
    assert [r.getMessage() for r in caplog.records] == [
        "allocation a1 granted: 5.6 GiB on gpu:0 for llm (priority high, owner me)"
    ]
    log.close()
    with caplog.at_level(logging.INFO, logger="vramancer.events"):
        bus.publish(ev.RuntimeStarted(node="n"))
    assert len(caplog.records) == 1  # unsubscribed


def test_start_times_are_bounded() -> None:
    bus = EventBus()
    log = EventLog(bus)
    for i in range(MAX_TRACKED_TASKS + 5):
        bus.publish(ev.TaskStateChanged(f"t{i}", "running", "scheduled", 1, None, None, None, "x"))
    assert len(log._started) == MAX_TRACKED_TASKS


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.04, "0.0 s"), (12.34, "12.3 s"), (125, "2 min 5 s"), (3780, "1 h 3 min")],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown
