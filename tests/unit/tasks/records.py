"""Task records for the pure tests (dispatch, admission, launch): a queued ``cmd`` task with
every field at a plain default, and the fields a test cares about given."""

from __future__ import annotations

from typing import Any

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import TaskRecord, TaskState, TaskType


def make_record(**fields: Any) -> TaskRecord:
    """A ``TaskRecord``: ``fields`` override the defaults below."""
    values: dict[str, Any] = {
        "task_id": "t1",
        "seq": 0,
        "type": TaskType.CMD,
        "state": TaskState.QUEUED,
        "priority": Priority.NORMAL,
        "spec_json": "{}",
        "attempts": 0,
        "max_retries": 0,
        "timeout_s": 60.0,
        "estimate_s": 60.0,
        "estimate_key": "cmd:x",
        "gpu": None,
        "vram_bytes": 0,
        "device": None,
        "lease_token": 0,
        "exit_code": None,
        "error": None,
        "submitted_at": 0.0,
        "scheduled_at": None,
        "started_at": None,
        "finished_at": None,
        "not_before": None,
        "cancel_requested": False,
        "pid": None,
    }
    values.update(fields)
    return TaskRecord(**values)
