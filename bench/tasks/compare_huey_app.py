"""huey app of the comparison: one task running the benchmark's work; ``SIGNAL_COMPLETE``
records finished tasks."""

from __future__ import annotations

from typing import Any

from huey import RedisHuey, signals

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, STARTED_KEY, do_work, now, redis_url

huey = RedisHuey(QUEUE_NAME, url=redis_url())


@huey.task()  # type: ignore[untyped-decorator]
def work(kind: str, mark: bool = False) -> None:
    """One task of the benchmark: ``kind`` is a ``Work`` value."""
    if mark:
        huey.storage.conn.rpush(STARTED_KEY, now())
    do_work(kind)


@huey.signal(signals.SIGNAL_COMPLETE)  # type: ignore[untyped-decorator]
def _record_done(signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
    huey.storage.conn.rpush(DONE_KEY, now())
