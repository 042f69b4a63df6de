"""RQ side of the comparison: the job function and its ``on_success`` recorder."""

from __future__ import annotations

from typing import Any

import redis

from bench.tasks.compare_common import DONE_KEY, STARTED_KEY, do_work, now, redis_url


def work(kind: str, mark: bool = False) -> None:
    """One task of the benchmark: ``kind`` is a ``Work`` value."""
    if mark:
        redis.Redis.from_url(redis_url()).rpush(STARTED_KEY, now())
    do_work(kind)


def record_done(job: Any, connection: redis.Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    """RQ ``on_success`` callback: one ``RPUSH`` per finished job."""
    connection.rpush(DONE_KEY, now())
