"""Celery app of the task benchmarks: a no-op task (the queue comparison) and one that runs
``true`` as a process (the pool benchmark, as a ``cmd`` task of VRAMancer does);
``task_postrun`` counts finished tasks in Redis."""

from __future__ import annotations

import subprocess
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


@app.task(name="bench.true")  # type: ignore[untyped-decorator]
def run_true() -> None:
    """Spawn ``true`` and wait for it: the same work as a ``cmd`` task ``["true"]``."""
    subprocess.run(["true"], check=True)


@task_postrun.connect  # type: ignore[untyped-decorator]
def _count_done(**_: Any) -> None:
    global _conn
    if _conn is None:  # one client per (forked) worker process
        _conn = redis.Redis.from_url(redis_url())
    _conn.incr(DONE_KEY)
