"""Celery app of the task benchmarks: one task running the benchmark's work (nothing, ``true``
as a process, or a Python function, as ``compare_common.Work`` says); ``task_postrun`` records
each finished task in Redis."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, STARTED_KEY, do_work, now, redis_url

app = Celery("bench_noop", broker=redis_url())
app.conf.update(
    task_default_queue=QUEUE_NAME,
    task_ignore_result=True,  # no result backend: "done" is recorded by the postrun hook
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_conn: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _conn
    if _conn is None:  # one client per (forked) worker process
        _conn = redis.Redis.from_url(redis_url())
    return _conn


@app.task(name="bench.work")  # type: ignore[untyped-decorator]
def work(kind: str, mark: bool = False) -> None:
    """One task of the benchmark: ``kind`` is a ``Work`` value."""
    if mark:
        _redis().rpush(STARTED_KEY, now())
    do_work(kind)


@task_postrun.connect  # type: ignore[untyped-decorator]
def _record_done(**_: Any) -> None:
    _redis().rpush(DONE_KEY, now())
