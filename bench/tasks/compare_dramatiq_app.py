"""Dramatiq app of the comparison: a Redis broker, one actor running the benchmark's work, a
middleware that records finished messages."""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, STARTED_KEY, do_work, now, redis_url

_conn: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _conn
    if _conn is None:  # created lazily, in the worker process
        _conn = redis.Redis.from_url(redis_url())
    return _conn


class RecordDone(Middleware):
    """Records every processed message with one ``RPUSH`` (after the actor returns)."""

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        _redis().rpush(DONE_KEY, now())


broker = RedisBroker(url=redis_url())  # type: ignore[no-untyped-call]
broker.add_middleware(RecordDone())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE_NAME, actor_name="bench_work")
def work(kind: str, mark: bool = False) -> None:
    """One task of the benchmark: ``kind`` is a ``Work`` value."""
    if mark:
        _redis().rpush(STARTED_KEY, now())
    do_work(kind)
