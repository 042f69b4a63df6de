"""Celery app of the comparison: one no-op task; ``task_postrun`` counts finished tasks."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, redis_url

app = Celery("bench_noop", broker=redis_url())
app.conf.update(
    task_default_queue=QUEUE_NAME,
    task_ignore_result=True,  # no result backend: "done" is counted by the postrun hook
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_conn: redis.Redis | None = None


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Does nothing: the benchmark measures the queue, not the work."""
    return None


@task_postrun.connect  # type: ignore[untyped-decorator]
def _count_done(**_: Any) -> None:
    global _conn
    if _conn is None:  # one client per (forked) worker process
        _conn = redis.Redis.from_url(redis_url())
    _conn.incr(DONE_KEY)
