"""Dramatiq app of the comparison: a Redis broker, one no-op actor, a middleware that counts."""

from __future__ import annotations

from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, redis_url


class CountDone(Middleware):
    """Counts every processed message with one ``INCR`` (after the actor returns)."""

    def __init__(self) -> None:
        self._conn: redis.Redis | None = None

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if self._conn is None:  # created lazily, in the worker process
            self._conn = redis.Redis.from_url(redis_url())
        self._conn.incr(DONE_KEY)


broker = RedisBroker(url=redis_url())  # type: ignore[no-untyped-call]
broker.add_middleware(CountDone())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE_NAME, actor_name="bench_noop")
def noop() -> None:
    """Does nothing: the benchmark measures the queue, not the work."""
    return None
