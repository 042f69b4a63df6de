"""Submissions for the queue tests (both queues): a ``cmd`` task with the fields a test sets."""

from __future__ import annotations

import json

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import NewTask, TaskSpec, TaskType

T0 = 1_700_000_000.0


def new(
    task_id: str,
    *,
    priority: Priority = Priority.NORMAL,
    estimate_s: float = 60.0,
    key: str | None = None,
    max_retries: int = 2,
    kind: TaskType = TaskType.CMD,
) -> NewTask:
    body: dict[str, object] = {"task_id": task_id, "type": kind.value, "priority": priority.value}
    if kind is TaskType.CMD:
        body["cmd"] = ["true"]
    if key:
        body["idempotency_key"] = key
    spec = TaskSpec.model_validate(body)
    return NewTask(
        task_id=task_id,
        spec=spec,
        spec_json=json.dumps(body),
        priority_rank=priority.rank,
        estimate_s=estimate_s,
        estimate_key="cmd:true",
        max_retries=max_retries,
        timeout_s=60.0,
        maintenance=kind.maintenance,
    )


def delay(attempts: int) -> float:
    return 10.0 * 2 ** (attempts - 1)
