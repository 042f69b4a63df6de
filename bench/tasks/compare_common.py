"""Shared names of the task-queue comparison: the work every system runs, where workers find
Redis, the lists they record into.

Every competitor's worker records a finished task with one Redis ``RPUSH`` of the time it ended
from its framework's own "task finished" hook (Celery ``task_postrun``, RQ ``on_success``, huey
``SIGNAL_COMPLETE``, Dramatiq ``after_process_message``), so the driver can tell "all done" the
same way for all four (``LLEN``) and, one task at a time, wait for it without polling
(``BLPOP``). A task asked to ``mark`` its start pushes the time it started as well (the
latency runs only: it costs one more round trip).
"""

from __future__ import annotations

import os
import subprocess
import time
from enum import StrEnum

#: Environment variable naming the Redis URL the worker apps and the driver use.
REDIS_URL_ENV = "BENCH_TASKS_REDIS_URL"
#: Redis list: one entry (end time, unix seconds) per finished task.
DONE_KEY = "bench:tasks:done"
#: Redis list: one entry (start time) per task that was asked to mark its start.
STARTED_KEY = "bench:tasks:started"
#: Queue / task names, the same for every framework.
QUEUE_NAME = "bench_noop"


class Work(StrEnum):
    """What one task does, the same on every side."""

    #: Nothing: the cheapest task each system can run (VRAMancer runs it inside the daemon).
    NOOP = "noop"
    #: Start the program ``true`` as a process and wait for it (VRAMancer: a ``cmd`` task).
    TRUE = "true"
    #: Call :func:`pyfunc` (VRAMancer: a ``python`` task, a fresh interpreter per task).
    PYTHON = "python"


def pyfunc() -> int:
    """The Python function of :attr:`Work.PYTHON`: a little arithmetic, no I/O."""
    return sum(range(1000))


def run_true() -> None:
    """The work of :attr:`Work.TRUE`: spawn ``true`` and wait for it."""
    subprocess.run(["true"], check=True)


def do_work(work: str) -> None:
    """Run one task's work in a competitor's worker."""
    if work == Work.TRUE.value:
        run_true()
    elif work == Work.PYTHON.value:
        pyfunc()


def redis_url() -> str:
    """The Redis URL the benchmark driver exported for its workers."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        raise RuntimeError(f"{REDIS_URL_ENV} is not set; run the workers via bench.tasks.compare")
    return url


def now() -> float:
    """Wall-clock time, comparable across the processes of this machine."""
    return time.time()
