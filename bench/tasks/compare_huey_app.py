"""huey app of the comparison: one no-op task; ``SIGNAL_COMPLETE`` counts finished tasks."""

from __future__ import annotations

from typing import Any

from huey import RedisHuey, signals

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, redis_url

huey = RedisHuey(QUEUE_NAME, url=redis_url())


@huey.task()  # type: ignore[untyped-decorator]
def noop() -> None:
    """Does nothing: the benchmark measures the queue, not the work."""
    return None


@huey.signal(signals.SIGNAL_COMPLETE)  # type: ignore[untyped-decorator]
def _count_done(signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
    huey.storage.conn.incr(DONE_KEY)
